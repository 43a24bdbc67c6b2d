"""FedOpt that learns its own server learning rate with Federated AD.

The server optimizer is any of TFF's FedOpt optimizers (`build_sgdm` with or
without momentum, `build_adam`, `build_adagrad`, `build_yogi`, ...). Each of
their steps is linear in the learning rate, and their state (momentum,
moments) does not depend on it: at rate lr a step is `w - lr * s` with
`s = step(state, delta)` the step at rate 1. The server keeps `log_lr` and
the pending step `s` (for plain SGD, the clients' averaged update `delta` of
the last round) next to the model. The model of round t is a function of the
rate,

    w_t(log_lr) = m_t - (exp(log_lr) - lr_t) * s          (server)

where `m_t` is the stored model (`state.global_model_weights`, computed with
the current rate `lr_t`, so w_t(log lr_t) = m_t exactly). The hypergradient
of the post-update loss L(w_t) = mean_i L_i(w_t) w.r.t. `log_lr` measures
whether the server steps were too long or too short; a hyper-optimizer then
moves `log_lr` (hypergradient descent, Baydin et al. 2018, in the federated
form of Rush, Charles & Garrett, "Federated Automatic Differentiation", 2024).

Which steps count is `tangent_decay` (g). The server carries T = dw/dlog_lr
from round to round:

    dw_t/dlog_lr = g * T_{t-1} - lr_t * delta              (server, free)

(`delta` above is the pending step `s`.) g = 0 is the greedy one-step
hypergradient: only the last step moves with
the rate. It is biased towards short steps (Wu et al. 2018, "Understanding
short-horizon bias"): from a low start it stops climbing early. g > 0 also
moves the earlier steps, with weight g^k for the step k rounds back, so the
derivative answers "would a larger rate over the last ~1/(1-g) rounds have
helped?". The carry treats the clients' updates, and so the optimizer's
steps `s`, as fixed (d delta/dw = 0; with momentum or Adam this is the only
approximation, the optimizer's state being independent of the rate):
differentiating local training would cost a model-sized tangent upload and
forward-over-reverse passes on every client, while T costs no communication
(the broadcast carries a tangent of w_t either way).

The round is one tff_fad program (`build_round_program`), differentiated
w.r.t. `(model, log_lr)` with the carried tangent as the model's direction:

  * mode='forward': the broadcast carries <w_t, dw_t/dlog_lr> in one message;
    each client returns <loss, d loss> (two scalars) with its model update,
    so the hypergradient rides on the round's own broadcast and upload: no
    extra round trip, +1 model-size downlink and +1 scalar uplink per client.
  * mode='reverse': a second sweep broadcasts the cotangent and each client
    uploads the gradient of its loss at w_t (model-size uplink) in a second
    round trip; the server contracts it with dw_t/dlog_lr.
  `communication_cost(process.next, n)` reports both, from the computation.

Local training is TFF's FedAvg client update (`functional_models`), treated
as constant in `w_t`, so training never has to be differentiated. The loss
is, by default (`post_update_loss='first_batch'`), each client's first local
batch's: the first local step computes its gradient at `w_t` anyway, so one
client call trains and returns the loss with its tangent (a dot product),
and a round costs about what TFF's FedAvg round costs.
`post_update_loss='all_batches'` evaluates the loss over all the client's
data in a second pass. Client data are datasets, so both bring per-batch
derivative rules (`with_derivatives`).

The processes are TFF-shaped: the state is a
`tff.learning.templates.LearningAlgorithmState` (the rate, the pending update
and the carried tangent are the finalizer's state), the metrics follow TFF's
`distributor / client_work / aggregator / finalizer` layout plus a
`hyperparameters` group with the learned quantities, and
`get_hparams`/`set_hparams` read and set the learned rate as
`hparams['finalizer']['learning_rate']`, where TFF's FedAvg keeps its fixed
one.
"""

import collections
from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad import aggregation
from tff_fad import core as fad
from tff_fad.core import local_ad
from tff_fad.learning import functional_models as fm

AggregationFactory = Union[tff.aggregators.UnweightedAggregationFactory,
                           tff.aggregators.WeightedAggregationFactory]
MODES = ('forward', 'reverse')
# Which post-update loss the hypergradient differentiates (`_post_update_loss_and_training`).
POST_UPDATE_LOSSES = ('first_batch', 'all_batches')
_STATE = tff.learning.templates.LearningAlgorithmState


def _check_args(mode, tangent_decay, post_update_loss):
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
  if post_update_loss not in POST_UPDATE_LOSSES:
    raise ValueError(f'post_update_loss must be one of {POST_UPDATE_LOSSES}, '
                     f'got {post_update_loss!r}.')
  if not 0.0 <= tangent_decay < 1.0:
    raise ValueError('tangent_decay must be in [0, 1) (0: greedy one-step '
                     f'hypergradient), got {tangent_decay!r}.')


def default_hyper_optimizer() -> tff.learning.optimizers.Optimizer:
  """Adam, learning rate 0.1, no momentum (beta_1 = 0).

  log(lr) moves by about 0.1 a round (more while the hypergradient grows
  faster than its running RMS, which Adam divides by). The carried tangent
  (`tangent_decay`) already averages the hypergradient over rounds; Adam's
  momentum on top of it keeps raising the rate for ~10 rounds after the
  hypergradient turns, which overshoots (see the README's experiments).
  """
  return tff.learning.optimizers.build_adam(learning_rate=0.1, beta_1=0.0)


def _default_client_optimizer():
  return tff.learning.optimizers.build_sgdm(learning_rate=0.1)


def _default_server_optimizer():
  return tff.learning.optimizers.build_sgdm(learning_rate=1.0)


def initial_server_learning_rate(
    server_optimizer: tff.learning.optimizers.Optimizer) -> float:
  """The learning rate of plain server SGD, the rate these processes learn.

  Raises:
    ValueError: If `server_optimizer` has hyperparameters other than a
      positive `learning_rate` (and a zero `momentum`): the learned update is
      `w - lr * delta`, plain SGD's.
  """
  hparams = server_optimizer.get_hparams(
      server_optimizer.initialize(tf.TensorSpec([], tf.float32)))
  extra = {k: v for k, v in hparams.items() if k != 'learning_rate'}
  if 'learning_rate' not in hparams or any(
      not (k == 'momentum' and float(v) == 0.0) for k, v in extra.items()):
    raise ValueError(
        'server_optimizer_fn: the learned rate is that of plain server SGD '
        '(tff.learning.optimizers.build_sgdm(learning_rate) without '
        'momentum), whose update is w - lr * delta; got an optimizer with '
        f'hyperparameters {dict(hparams)}.')
  rate = float(hparams['learning_rate'])
  if not rate > 0:
    raise ValueError('server_optimizer_fn: the initial server learning rate '
                     f'must be > 0 (it is learned in log space), got {rate}.')
  return rate


def _batch_loss_sum(model, weights, batch):
  """Summed (not mean) loss of a batch and its example count (float32)."""
  loss, _, n = fm.batch_loss(model, weights, batch, training=False)
  n = tf.cast(n, tf.float32)
  return loss * n, n


def build_post_update_loss(model: tff.learning.models.FunctionalModel):
  """`(model_weights, dataset) -> (loss_sum, num_examples)` with rules.

  The forward and reverse rules run the derivative batch by batch inside the
  dataset loop (derivatives of a sum are sums), which TF's AD cannot do from
  outside the loop.
  """

  def loss_sum(weights, dataset):
    return dataset.reduce(
        (0.0, 0.0),
        lambda acc, b: tuple(a + x for a, x in zip(
            acc, _batch_loss_sum(model, weights, b))))

  def jvp_rule(primals, tangents):
    weights, dataset = primals
    trainable, non_trainable = weights
    d_trainable = tangents[0][0]

    def step(acc, batch):
      with tf.autodiff.ForwardAccumulator(trainable, d_trainable) as fwd:
        loss, n = _batch_loss_sum(model, (trainable, non_trainable), batch)
      d_loss = fwd.jvp(loss, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return acc[0] + loss, acc[1] + n, acc[2] + d_loss

    total, count, d_total = dataset.reduce((0.0, 0.0, 0.0), step)
    return (total, count), (d_total, tf.zeros([]))

  def vjp_rule(primals, active, cotangent):
    weights, dataset = primals
    trainable, non_trainable = weights
    ct_loss = cotangent[0]

    def step(acc, batch):
      with tf.GradientTape() as tape:
        tape.watch(trainable)
        loss, _ = _batch_loss_sum(model, (trainable, non_trainable), batch)
      grads = tape.gradient(loss, trainable)
      return tf.nest.map_structure(lambda a, g: a + ct_loss * g, acc, grads)

    zeros = tf.nest.map_structure(tf.zeros_like, trainable)
    d_trainable = dataset.reduce(zeros, step)
    d_weights = (d_trainable, tf.nest.map_structure(tf.zeros_like,
                                                    non_trainable))
    return [d_weights if active[0] else None, None]

  return fad.with_derivatives(loss_sum, jvp=jvp_rule, vjp=vjp_rule)


def build_training_with_first_batch_loss(
    model: tff.learning.models.FunctionalModel,
    client_optimizer: tff.learning.optimizers.Optimizer,
    client_weighting: tff.learning.ClientWeighting):
  """`(model_weights, dataset) -> ((loss_sum, num_examples), outputs)`.

  Local training (`functional_models.build_local_training`'s outputs) and
  the summed training loss of the first batch at `model_weights`, with
  rules that reuse the gradient the first local step computes: the forward
  rule's loss tangent is `<gradient, tangent>` (a dot product, no second
  pass over the data), the reverse rule recomputes that one batch's
  gradient. Training counts as constant in `model_weights` (zero tangents,
  cotangents ignored), as the module docstring explains.
  """

  def first_loss(loss, n, unused_gradients):
    return loss * n, n

  train = fm.build_local_training(model, client_optimizer, client_weighting,
                                  first_batch=first_loss)

  def training_with_first_batch_loss(weights, dataset):
    outputs, first = train(weights, dataset)
    return first, outputs

  def jvp_rule(primals, tangents, num_directions):
    weights, dataset = primals
    # Non-trainable weights are not moved by training's tangents here.
    d_trainable = tangents[0][0]
    directions = [] if num_directions is None else [num_directions]

    def first_loss_and_tangent(loss, n, gradients):
      d_loss = sum(
          tf.reduce_sum(tf.reshape(g * t, directions + [-1]), axis=-1)
          for g, t in zip(tf.nest.flatten(gradients),
                          tf.nest.flatten(d_trainable)))
      return loss * n, n, d_loss * n

    outputs, (loss_sum, count, d_loss_sum) = fm.build_local_training(
        model, client_optimizer, client_weighting,
        first_batch=first_loss_and_tangent)(weights, dataset)
    return ((loss_sum, count), outputs), (
        (d_loss_sum, tf.zeros(directions)),
        local_ad.zeros_like_tangent(outputs, num_directions))

  def vjp_rule(primals, active, cotangent):
    (trainable, non_trainable), dataset = primals

    def gradient_sum(acc, batch):
      with tf.GradientTape() as tape:
        tape.watch(trainable)
        loss, _, n = fm.batch_loss(model, (trainable, non_trainable), batch,
                                   training=True)
        loss_sum = loss * tf.cast(n, tf.float32)
      return tf.nest.map_structure(tf.add, acc,
                                   tape.gradient(loss_sum, trainable))

    d_trainable = dataset.take(1).reduce(
        tf.nest.map_structure(tf.zeros_like, trainable), gradient_sum)
    d_weights = (tf.nest.map_structure(lambda g: cotangent[0][0] * g,
                                       d_trainable),
                 tf.nest.map_structure(tf.zeros_like, non_trainable))
    return [d_weights if active[0] else None, None]

  return fad.with_derivatives(training_with_first_batch_loss, jvp=jvp_rule,
                              vjp=vjp_rule, batched_jvp=True)


def server_optimizer_learning_rate(
    server_optimizer: tff.learning.optimizers.Optimizer) -> float:
  """The starting rate of any FedOpt server optimizer (SGD(M), Adam, ...).

  Raises:
    ValueError: If the optimizer has no positive `learning_rate`
      hyperparameter, or its step depends on the weights (decoupled weight
      decay): the learned update must be `w - lr * step(state, delta)`.
  """
  hparams = server_optimizer.get_hparams(
      server_optimizer.initialize(tf.TensorSpec([], tf.float32)))
  if 'learning_rate' not in hparams:
    raise ValueError(
        'server_optimizer_fn: the learned rate is the server optimizer\'s '
        '`learning_rate` hyperparameter, which this optimizer does not have '
        f'(hyperparameters {dict(hparams)}).')
  if any('decay' in k for k in hparams if k != 'learning_rate'):
    raise ValueError(
        'server_optimizer_fn: an optimizer with weight decay '
        f'({dict(hparams)}) takes a step that depends on the weights; the '
        'learned update needs w - lr * step(optimizer state, update).')
  rate = float(hparams['learning_rate'])
  if not rate > 0:
    raise ValueError('server_optimizer_fn: the initial server learning rate '
                     f'must be > 0 (it is learned in log space), got {rate}.')
  return rate


def _unit_rate_state(server_optimizer, specs):
  """The optimizer's initial state at learning rate 1: its `next` then
  returns the step per unit rate."""
  state = server_optimizer.initialize(specs)
  hparams = collections.OrderedDict(server_optimizer.get_hparams(state))
  hparams['learning_rate'] = tf.constant(1.0, tf.float32)
  return server_optimizer.set_hparams(state, hparams)


def _unit_step(server_optimizer, optimizer_state, update):
  """`(new state, s)`: the optimizer's step at rate 1 for `update`.

  Every FedOpt optimizer's step is linear in its rate and its state
  (momentum, moments) does not depend on the rate, so at rate lr the new
  model is `w - lr * s`. Applying the step to zeros gives s exactly.
  """
  zeros = tf.nest.map_structure(tf.zeros_like, update)
  new_state, moved = server_optimizer.next(optimizer_state, zeros, update)
  return new_state, tuple(-m for m in tf.nest.flatten(moved))


def _pair_type(model) -> tff.Type:
  """`(trainable, non_trainable)`, the weights a FunctionalModel takes."""
  spec = fm.weights_spec(model)
  return tff.types.tensorflow_to_type((spec.trainable, spec.non_trainable))


def _current_model(model_weights, log_lr, pending, stored_log_lr):
  """w(log_lr) = m - (exp(log_lr) - exp(stored_log_lr)) * pending.

  `m` was computed with the rate exp(stored_log_lr); at that rate (the
  state's) w is exactly m.
  """
  shift = tf.exp(log_lr) - tf.exp(stored_log_lr)
  trainable = tf.nest.map_structure(lambda m, p: m - shift * p,
                                    model_weights[0], pending)
  return (trainable, model_weights[1])


def _mean_or_nan(loss_sum_and_count):
  """The mean loss; NaN in a round without examples (there is no loss).

  The derivative is 0 there: the division's denominator stays >= 1, so no
  0/0 reaches the unselected branch's gradient.
  """
  loss_sum, count = loss_sum_and_count
  return tf.where(count > 0, loss_sum / tf.maximum(count, 1.0),
                  tf.constant(np.nan, loss_sum.dtype))


def _post_update_loss_and_training(model, client_optimizer, client_weighting,
                                   post_update_loss, at_clients, data,
                                   loss_point=None, loss_state=None):
  """The clients' loss at the broadcast model, and their local training.

  `post_update_loss='first_batch'`: one client call, the loss of each
  client's first batch, whose gradient local training computes anyway;
  'all_batches': the loss over all the client's data, a second pass.
  Returns `(loss, client outputs, loss aggregate)`. Without `loss_point` the
  loss is the example-weighted mean (a plain sum of loss sums and counts)
  and the loss aggregate is None; with it, each client's mean loss goes
  through the point's aggregator (e.g. DP: clipped and noised, its
  derivative by the point's tangent aggregator) and the loss aggregate is
  the point's `(new state, measurements)`.
  """
  if post_update_loss == 'first_batch':
    loss_and_outputs = fad.federated_map(
        build_training_with_first_batch_loss(model, client_optimizer,
                                             client_weighting),
        (at_clients, data))
    loss_and_count, client_outputs = loss_and_outputs[0], loss_and_outputs[1]
  else:
    loss_and_count = fad.federated_map(build_post_update_loss(model),
                                       (at_clients, data))
    client_outputs = fad.federated_map(
        fm.build_local_training(model, client_optimizer, client_weighting),
        (fad.stop_gradient(at_clients), data))
  if loss_point is None:
    loss = fad.federated_apply(_mean_or_nan, fad.federated_sum(loss_and_count))
    return loss, client_outputs, None
  client_loss = fad.federated_map(lambda t: t[0] / tf.maximum(t[1], 1.0),
                                  loss_and_count)
  aggregate = aggregation.aggregate_with_factory(client_loss, loss_state,
                                                 loss_point)
  return aggregate.result, client_outputs, (aggregate.state,
                                            aggregate.measurements)


def build_round_program(
    model, client_optimizer,
    client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
    post_update_loss='first_batch', loss_point=None):
  """The differentiable part of one round, as a tff_fad program.

  `(model@S, log_lr@S, pending@S, stored_log_lr@S, data{Seq}@C) ->
  (post_update_loss@S, aux=(w_t@S, {client outputs}@CLIENTS))`: the loss at
  `w_t = model - (exp(log_lr) - exp(stored_log_lr)) * pending` (the state
  holds `model` computed at the rate exp(stored_log_lr), and the program is
  called with log_lr = stored_log_lr). `model` and `w_t` are
  `(trainable, non_trainable)` pairs; the client outputs are
  `functional_models.build_local_training`'s.

  With `loss_point` (an `aggregation.AggregationPoint` for the clients' mean
  losses, e.g. DP) the program takes the point's state after
  `stored_log_lr` and the aux adds `(new state, measurements)`.
  """
  pair_type = _pair_type(model)
  head = [tff.FederatedType(pair_type, tff.SERVER),
          tff.FederatedType(np.float32, tff.SERVER),
          tff.FederatedType(pair_type[0], tff.SERVER),
          tff.FederatedType(np.float32, tff.SERVER)]
  data_type = tff.FederatedType(fm.data_type(model), tff.CLIENTS)

  def one_round(model_weights, log_lr, pending, stored_log_lr, data,
                loss_state=None):
    weights = fad.federated_apply(
        _current_model, (model_weights, log_lr, pending, stored_log_lr))
    loss, client_outputs, loss_aggregate = _post_update_loss_and_training(
        model, client_optimizer, client_weighting, post_update_loss,
        fad.federated_broadcast(weights), data, loss_point, loss_state)
    if loss_aggregate is None:
      return loss, (weights, client_outputs)
    return loss, (weights, client_outputs, loss_aggregate)

  if loss_point is None:

    @fad.federated_computation(*head, data_type)
    def round_program(model_weights, log_lr, pending, stored_log_lr, data):
      return one_round(model_weights, log_lr, pending, stored_log_lr, data)

    return round_program

  @fad.federated_computation(*head, loss_point.state_type, data_type)
  def private_round_program(model_weights, log_lr, pending, stored_log_lr,
                            loss_state, data):
    return one_round(model_weights, log_lr, pending, stored_log_lr, data,
                     loss_state)

  return private_round_program


def _zeros_like_trainable(model, leading=()):
  return tuple(tf.zeros(list(leading) + list(np.shape(w)), tf.float32)
               for w in model.initial_weights[0])


def _next_model(round_weights, log_lr, pending):
  """The stored model after a round: `w_t - exp(log_lr) * pending`.

  `round_weights` is the `(trainable, non_trainable)` model the round's
  clients trained from, `log_lr` the new rate, `pending` the new update.
  """
  lr = tf.exp(log_lr)
  return tff.learning.models.ModelWeights(
      trainable=tuple(w - lr * p for w, p in zip(round_weights[0], pending)),
      non_trainable=round_weights[1])


def _hyper_step(hyper_optimizer, hyper_state, values, hypergradients):
  """One hyper-optimizer step; a non-finite hypergradient counts as 0.

  A diverged round must not poison the learned values.
  """
  hypergradients = tf.nest.map_structure(
      lambda g: tf.where(tf.math.is_finite(g), g, tf.zeros_like(g)),
      hypergradients)
  return hyper_optimizer.next(hyper_state, values, hypergradients)


def _as_pair(model_weights):
  return (tuple(model_weights.trainable), tuple(model_weights.non_trainable))


def _model_accessors(state_member, model):
  """`get_model_weights` / `set_model_weights` of a learning process.

  Setting weights clears the pending update and the carried tangents (the
  new model has no history); the rest of the state is kept.
  """

  @tff.tensorflow.computation(state_member)
  def get_model_weights(state):
    return state.global_model_weights

  @tff.tensorflow.computation(state_member, fm.weights_type(model))
  def set_model_weights(state, model_weights):
    finalizer = collections.OrderedDict(state.finalizer)
    for key in ('pending', 'pending_tangent', 'model_tangent'):
      if key in finalizer:
        finalizer[key] = tf.nest.map_structure(tf.zeros_like, finalizer[key])
    return _STATE(
        global_model_weights=model_weights, distributor=state.distributor,
        client_work=state.client_work, aggregator=state.aggregator,
        finalizer=finalizer)

  return get_model_weights, set_model_weights


def _hparams_accessors(state_member, learned):
  """`get_hparams` / `set_hparams`: the learned values under 'finalizer'.

  `learned` maps an hparam name to its finalizer state key and the
  (to state, from state) conversions. Setting the learning rate moves the
  stored model along the pending update, so the model stays
  `w(lr) = m - (lr - lr_old) * pending`, as if the new rate had been used.
  """

  @tff.tensorflow.computation(state_member)
  def get_hparams(state):
    return collections.OrderedDict(
        client_work=collections.OrderedDict(),
        finalizer=collections.OrderedDict(
            (name, from_state(state.finalizer[key]))
            for name, (key, _, from_state) in learned.items()))

  hparams_type = get_hparams.type_signature.result

  @tff.tensorflow.computation(state_member, hparams_type)
  def set_hparams(state, hparams):
    finalizer = collections.OrderedDict(state.finalizer)
    for name, (key, to_state, _) in learned.items():
      finalizer[key] = to_state(hparams['finalizer'][name])
    lr = tf.exp(finalizer['log_lr'])
    old_lr = tf.exp(state.finalizer['log_lr'])
    trainable = tuple(m - (lr - old_lr) * p for m, p in zip(
        state.global_model_weights.trainable, finalizer['pending']))
    return _STATE(
        global_model_weights=tff.learning.models.ModelWeights(
            trainable=trainable,
            non_trainable=state.global_model_weights.non_trainable),
        distributor=state.distributor, client_work=state.client_work,
        aggregator=state.aggregator, finalizer=finalizer)

  return get_hparams, set_hparams


def _log_of_positive(name):
  def to_state(value):
    with tf.control_dependencies([tf.debugging.assert_positive(
        value, message=f'{name} must be > 0 (it is learned in log space)')]):
      return tf.math.log(tf.cast(value, tf.float32))
  return to_state


_LEARNING_RATE_HPARAM = {
    'learning_rate': ('log_lr', _log_of_positive('learning_rate'), tf.exp)}


def _learning_algorithm_state(model_weights, aggregator, finalizer):
  """The federated `LearningAlgorithmState` (stateless distributor, client work)."""
  empty = tff.federated_value((), tff.SERVER)
  return tff.federated_zip(_STATE(
      global_model_weights=model_weights, distributor=empty,
      client_work=empty, aggregator=aggregator, finalizer=finalizer))


def _round_metrics(train, aggregator, update_non_finite, hyperparameters):
  """TFF's metrics layout plus the `hyperparameters` group."""
  return tff.federated_zip(collections.OrderedDict(
      distributor=tff.federated_value((), tff.SERVER),
      client_work=tff.federated_zip(collections.OrderedDict(train=train)),
      aggregator=aggregator,
      finalizer=tff.federated_zip(collections.OrderedDict(
          update_non_finite=update_non_finite)),
      hyperparameters=tff.federated_zip(hyperparameters)))


def _resolve_common(builder, model_fn, client_optimizer_fn, server_optimizer_fn,
                    hyper_optimizer_fn, tangent_decay, post_update_loss,
                    mode='forward'):
  model = fm.resolve_model(model_fn, builder)
  client_optimizer = fm.resolve_optimizer(
      client_optimizer_fn, 'client_optimizer_fn', _default_client_optimizer)
  server_optimizer = fm.resolve_optimizer(
      server_optimizer_fn, 'server_optimizer_fn', _default_server_optimizer)
  hyper_optimizer = fm.resolve_optimizer(
      hyper_optimizer_fn, 'hyper_optimizer_fn', default_hyper_optimizer)
  _check_args(mode, tangent_decay, post_update_loss)
  return model, client_optimizer, server_optimizer, hyper_optimizer


def _is_differentially_private(factory) -> bool:
  return isinstance(factory, tff.aggregators.DifferentiallyPrivateFactory)


def _loss_point(model_aggregator, loss_aggregator, hypergradient_aggregator,
                mode) -> Optional[aggregation.AggregationPoint]:
  """The aggregation point of the post-update losses, or None (plain)."""
  if (loss_aggregator is None) != (hypergradient_aggregator is None):
    raise ValueError(
        'loss_aggregator and hypergradient_aggregator go together: the loss '
        'and its derivative are both releases of client data.')
  if loss_aggregator is None:
    if _is_differentially_private(model_aggregator):
      raise ValueError(
          'model_aggregator is differentially private, but the post-update '
          'loss and its derivative, which steer the learning rate, would be '
          'released as plain sums of client data. Pass loss_aggregator and '
          'hypergradient_aggregator (e.g. tff.aggregators.'
          'DifferentiallyPrivateFactory.gaussian_fixed with their own '
          'clips).')
    return None
  for name, f in (('loss_aggregator', loss_aggregator),
                  ('hypergradient_aggregator', hypergradient_aggregator)):
    if not isinstance(f, tff.aggregators.UnweightedAggregationFactory):
      raise TypeError(f'{name} must be a tff.aggregators.'
                      f'UnweightedAggregationFactory, got {f!r}.')
  if mode != 'forward':
    raise ValueError(
        f"loss_aggregator needs mode='forward' (got {mode!r}): reverse mode "
        'would release each client\'s model-sized loss gradient, which these '
        'aggregators do not cover.')
  return aggregation.AggregationPoint(
      loss_aggregator, np.float32, tangent_factory=hypergradient_aggregator,
      name='post_update_loss')


def build_hypergradient_fed_avg(
    model_fn: fm.ModelArg,
    client_optimizer_fn: Optional[fm.OptimizerArg] = None,
    server_optimizer_fn: Optional[fm.OptimizerArg] = None,
    *,
    hyper_optimizer_fn: Optional[fm.OptimizerArg] = None,
    client_weighting: tff.learning.ClientWeighting = (
        tff.learning.ClientWeighting.NUM_EXAMPLES),
    model_aggregator: Optional[AggregationFactory] = None,
    metrics_aggregator: Optional[fm.MetricsAggregator] = None,
    mode: str = 'forward',
    tangent_decay: float = 0.9,
    post_update_loss: str = 'first_batch',
    loss_aggregator: Optional[
        tff.aggregators.UnweightedAggregationFactory] = None,
    hypergradient_aggregator: Optional[
        tff.aggregators.UnweightedAggregationFactory] = None,
) -> tff.learning.templates.LearningProcess:
  """FedAvg whose server learning rate is learned by Federated AD.

  Takes what `tff.learning.algorithms.build_weighted_fed_avg` takes. `next`
  has type `(state@SERVER, {Sequence[batch]}@CLIENTS) -> <state@SERVER,
  metrics@SERVER>`; one round is one broadcast of the model (with its
  tangent in forward mode) and one upload of model updates (with the loss
  and its derivative); see the module docstring for the modes. With a
  hyper-optimizer of learning rate 0 it is TFF's FedAvg (FedOpt) with the
  same server optimizer.

  Args:
    model_fn: A `tff.learning.models.FunctionalModel` or a no-argument
      function returning one (Keras models: through
      `tff.learning.models.functional_model_from_keras`).
    client_optimizer_fn: A `tff.learning.optimizers.Optimizer` for local
      training (or a function returning one); default SGD, rate 0.1.
    server_optimizer_fn: Any FedOpt server optimizer with a
      `learning_rate` hyperparameter (`build_sgdm`, with or without
      momentum, `build_adam`, `build_adagrad`, `build_yogi`): its rate is the
      starting point of the learned one. Default: SGD, rate 1.0. Optimizers
      with weight decay are refused (their step depends on the weights).
    hyper_optimizer_fn: Optimizer of `log(server learning rate)`; default
      `default_hyper_optimizer()`.
    client_weighting: `tff.learning.ClientWeighting` of the update average
      (used by weighted `model_aggregator`s).
    model_aggregator: A `tff.aggregators` factory for the model updates;
      weighted factories get the client weights. Default: weighted mean.
    metrics_aggregator: Aggregates the model's training metrics, as in TFF;
      default `tff.learning.metrics.sum_then_finalize`.
    mode: 'forward' or 'reverse' accumulation of the hypergradient.
    tangent_decay: In [0, 1): how much of dw/dlog_lr carries over to the
      next round (module docstring). 0 is the greedy one-step
      hypergradient; the default 0.9 looks back about 10 rounds.
    post_update_loss: 'first_batch' (each client's first local batch, whose
      gradient local training computes anyway: FedAvg's cost) or
      'all_batches' (all its data, a second pass).
    loss_aggregator: With `hypergradient_aggregator`, aggregates the
      clients' mean post-update losses (instead of a plain example-weighted
      mean), e.g. `tff.aggregators.DifferentiallyPrivateFactory.
      gaussian_fixed(z, clients_per_round, clip)`: each client's loss is
      clipped and the sum noised, so the rate is steered by DP releases.
      Required when `model_aggregator` is differentially private (the
      round's every use of client data is then DP; `round_privacy_report`
      accounts it). Forward mode only.
    hypergradient_aggregator: Aggregates the losses' derivatives w.r.t. log
      lr (the loss's tangent: a separate release, with its own clip).

  Returns:
    A `tff.learning.templates.LearningProcess` whose state is a
    `LearningAlgorithmState` and whose metrics are TFF's (`client_work/train`
    holds the model's metrics) plus `hyperparameters`:
    `server_learning_rate` (used this round), `hypergradient`
    (d loss / d log lr) and `post_update_loss` (the clients' loss at the
    round's model, before local training: over their first batches or all
    their data, per `post_update_loss`). `get_hparams(state)['finalizer']
    ['learning_rate']` is the learned rate; `set_hparams` sets it.

  Raises:
    TypeError: For a model, optimizer, weighting or aggregator of the wrong
      kind, naming the argument.
    ValueError: For bad values, naming the argument.
  """
  model, client_optimizer, server_optimizer, hyper_optimizer = (
      _resolve_common('build_hypergradient_fed_avg', model_fn,
                      client_optimizer_fn, server_optimizer_fn,
                      hyper_optimizer_fn, tangent_decay, post_update_loss,
                      mode))
  lr0 = server_optimizer_learning_rate(server_optimizer)
  fm.check_client_weighting(client_weighting)
  model_aggregator = model_aggregator or tff.aggregators.MeanFactory()
  weighted = isinstance(model_aggregator,
                        tff.aggregators.WeightedAggregationFactory)
  if not weighted and not isinstance(
      model_aggregator, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError('model_aggregator must be a tff.aggregators factory, got '
                    f'{type(model_aggregator).__name__}.')

  loss_point = _loss_point(model_aggregator, loss_aggregator,
                           hypergradient_aggregator, mode)
  round_program = build_round_program(model, client_optimizer,
                                      client_weighting, post_update_loss,
                                      loss_point)
  # d loss/d log_lr = dL/dw . (decay * dm/d log_lr - lr * pending): the
  # derivative w.r.t. the stored model carries the earlier rounds' steps.
  wrt = ('model_weights', 'log_lr')
  if mode == 'forward':
    differentiated = fad.jvp(round_program, wrt=wrt, has_aux=True)
  else:
    differentiated = fad.value_and_grad(round_program, wrt=wrt, mode=mode,
                                        has_aux=True)

  trainable_type = _pair_type(model)[0]
  if weighted:
    model_aggregation = model_aggregator.create(trainable_type,
                                                tff.TensorType(np.float32))
  else:
    model_aggregation = model_aggregator.create(trainable_type)
  log_lr0 = float(np.log(lr0))

  @tff.tensorflow.computation
  def initial_values():
    zeros = _zeros_like_trainable(model)
    return fm.initial_model_weights(model), collections.OrderedDict(
        log_lr=tf.constant(log_lr0, tf.float32),
        # The server optimizer's last step per unit rate.
        pending=zeros,
        # d(stored model)/d log_lr: the earlier rounds' steps.
        model_tangent=zeros,
        # At rate 1: the learned rate multiplies its steps.
        server_optimizer=_unit_rate_state(
            server_optimizer,
            tuple(tf.TensorSpec(z.shape, z.dtype) for z in zeros)),
        hyper_optimizer=hyper_optimizer.initialize(
            tf.TensorSpec([], tf.float32)))

  @tff.federated_computation
  def initialize():
    values = tff.federated_eval(initial_values, tff.SERVER)
    aggregator_state = model_aggregation.initialize()
    if loss_point is not None:
      aggregator_state = tff.federated_zip(collections.OrderedDict(
          model_update=aggregator_state,
          post_update_loss=loss_point.initialize()))
    return _learning_algorithm_state(values[0], aggregator_state, values[1])

  state_type = initialize.type_signature.result
  state_member = state_type.member

  @tff.tensorflow.computation(state_member)
  def round_inputs(state):
    pair = _as_pair(state.global_model_weights)
    tangent = (tuple(tangent_decay * t
                     for t in state.finalizer['model_tangent']),
               tuple(tf.zeros_like(t) for t in pair[1]))
    return pair, tangent

  @tff.tensorflow.computation
  def hypergradient_of(gradients, model_tangent):
    (d_model, _), d_log_lr = gradients
    return d_log_lr + sum(
        tf.reduce_sum(g * t) for g, t in zip(tf.nest.flatten(d_model),
                                             tf.nest.flatten(model_tangent[0])))

  @tff.tensorflow.computation
  def server_update(finalizer, weights, update, hypergradient):
    update, non_finite = fm.zero_if_non_finite(update)
    hyper_state, new_log_lr = _hyper_step(
        hyper_optimizer, finalizer['hyper_optimizer'], finalizer['log_lr'],
        hypergradient)
    lr = tf.exp(finalizer['log_lr'])
    # A skipped (non-finite) round leaves the optimizer's state as it was.
    stepped_state, step = _unit_step(server_optimizer,
                                     finalizer['server_optimizer'], update)
    optimizer_state = tf.cond(
        non_finite > 0, lambda: finalizer['server_optimizer'],
        lambda: stepped_state)
    step = tuple(tf.where(non_finite > 0, tf.zeros_like(x), x) for x in step)
    new_model = _next_model(weights, new_log_lr, step)
    new_finalizer = collections.OrderedDict(
        log_lr=new_log_lr, pending=step,
        # d w_t / d log_lr, the next round's d(stored model) / d log_lr.
        model_tangent=tuple(tangent_decay * t - lr * p for t, p in zip(
            finalizer['model_tangent'], finalizer['pending'])),
        server_optimizer=optimizer_state,
        hyper_optimizer=hyper_state)
    return new_model, new_finalizer, non_finite, lr

  @tff.federated_computation(
      state_type, tff.FederatedType(fm.data_type(model), tff.CLIENTS))
  def next_fn(state, client_data):
    inputs = tff.federated_map(round_inputs, state)
    log_lr, pending = state.finalizer['log_lr'], state.finalizer['pending']
    model_update_state, loss_state = state.aggregator, []
    if loss_point is not None:
      model_update_state = state.aggregator['model_update']
      loss_state = [state.aggregator['post_update_loss']]
    if mode == 'forward':
      loss, hypergradient, (weights, client_outputs, *loss_aggregate) = (
          differentiated(inputs[0], log_lr, pending, log_lr, *loss_state,
                         client_data, inputs[1],
                         tff.federated_value(np.float32(1.0), tff.SERVER)))
    else:
      (loss, (weights, client_outputs)), gradients = differentiated(
          inputs[0], log_lr, pending, log_lr, client_data)
      hypergradient = tff.federated_map(hypergradient_of, (
          tff.federated_zip(gradients), inputs[1]))
    if weighted:
      aggregate = model_aggregation.next(
          model_update_state, client_outputs['update'],
          client_outputs['weight'])
    else:
      aggregate = model_aggregation.next(model_update_state,
                                         client_outputs['update'])
    aggregator_state, measurements = aggregate.state, aggregate.measurements
    if loss_point is not None:
      (loss_aggregate,) = loss_aggregate  # (new state, measurements).
      aggregator_state = tff.federated_zip(collections.OrderedDict(
          model_update=aggregate.state, post_update_loss=loss_aggregate[0]))
      measurements = tff.federated_zip(collections.OrderedDict(
          model_update=aggregate.measurements,
          post_update_loss=loss_aggregate[1]))
    train = fm.aggregate_metrics(metrics_aggregator, model,
                                 client_outputs['metrics'])
    updated = tff.federated_map(server_update, (
        state.finalizer, weights, aggregate.result, hypergradient))
    new_state = _learning_algorithm_state(updated[0], aggregator_state,
                                          updated[1])
    metrics = _round_metrics(
        train, measurements, updated[2], collections.OrderedDict(
            server_learning_rate=updated[3], hypergradient=hypergradient,
            post_update_loss=loss))
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)

  get_model_weights, set_model_weights = _model_accessors(state_member, model)
  get_hparams, set_hparams = _hparams_accessors(state_member,
                                                _LEARNING_RATE_HPARAM)
  return tff.learning.templates.LearningProcess(
      initialize, next_fn, get_model_weights, set_model_weights,
      get_hparams_fn=get_hparams, set_hparams_fn=set_hparams)


def round_privacy_report(
    model_fn: fm.ModelArg,
    client_optimizer_fn: Optional[fm.OptimizerArg] = None,
    *,
    model_aggregator: AggregationFactory,
    loss_aggregator: tff.aggregators.UnweightedAggregationFactory,
    hypergradient_aggregator: tff.aggregators.UnweightedAggregationFactory,
    post_update_loss: str = 'first_batch',
    client_weighting: tff.learning.ClientWeighting = (
        tff.learning.ClientWeighting.NUM_EXAMPLES),
    metrics_released: bool = True,
    sampling_rate: float,
    rounds: int,
    delta: float,
) -> aggregation.PrivacyReport:
  """(epsilon, delta) of `rounds` rounds of `build_hypergradient_fed_avg`
  with these aggregators (forward mode).

  Every release of client data in a round: the post-update loss and its
  tangent (read off the round's derivative program, so nothing it
  aggregates is missed), the model update (`model_aggregator`), and the
  clients' training metrics unless `metrics_released=False` (the process
  built with `metrics_aggregator=functional_models.release_no_metrics`).
  Plain releases make epsilon infinite and are named in the report.
  """
  model = fm.resolve_model(model_fn, 'round_privacy_report')
  client_optimizer = fm.resolve_optimizer(
      client_optimizer_fn, 'client_optimizer_fn', _default_client_optimizer)
  loss_point = _loss_point(model_aggregator, loss_aggregator,
                           hypergradient_aggregator, 'forward')
  round_program = build_round_program(model, client_optimizer,
                                      client_weighting, post_update_loss,
                                      loss_point)
  extra = [aggregation.factory_release('model_update (model_aggregator)',
                                       model_aggregator,
                                       _pair_type(model)[0])]
  if metrics_released:
    extra.append(aggregation.Release(
        'client_work/train metrics (metrics_aggregator)', 'value', 'plain'))
  return aggregation.privacy_report(
      round_program, mode='forward', wrt=('model_weights', 'log_lr'),
      has_aux=True, sampling_rate=sampling_rate, rounds=rounds, delta=delta,
      extra_releases=extra)


def build_learned_weighting_round_program(model, client_optimizer,
                                          post_update_loss='first_batch'):
  """A round whose update is a weighted mean with learnable client weights.

  Client i's aggregation weight is `n_i ** exponent` (n_i its example count;
  0 for a client whose update was not finite): exponent 0 is the uniform
  mean, 1 the example-weighted mean FedAvg uses.
  `(model@S, log_lr@S, pending@S, stored_log_lr@S, exponent@S,
  data{Seq}@C) -> ((post_update_loss@S, new_pending@S),
  aux=(w_t@S, {client outputs}@C))`, `w_t` as in `build_round_program`.
  """
  pair_type = _pair_type(model)

  def aggregation_weight(count, exponent):
    return tf.where(count > 0.0,
                    tf.exp(exponent * tf.math.log(tf.maximum(count, 1.0))),
                    0.0)

  @fad.federated_computation(
      tff.FederatedType(pair_type, tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      tff.FederatedType(pair_type[0], tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      tff.FederatedType(fm.data_type(model), tff.CLIENTS))
  def round_program(model_weights, log_lr, pending, stored_log_lr, exponent,
                    data):
    weights = fad.federated_apply(
        _current_model, (model_weights, log_lr, pending, stored_log_lr))
    loss, client_outputs, _ = _post_update_loss_and_training(
        model, client_optimizer, tff.learning.ClientWeighting.NUM_EXAMPLES,
        post_update_loss, fad.federated_broadcast(weights), data)
    mixing = fad.federated_map(
        aggregation_weight,
        (client_outputs['weight'], fad.federated_broadcast(exponent)))
    new_pending = fad.federated_mean(client_outputs['update'], weight=mixing)
    return (loss, new_pending), (weights, client_outputs)

  return round_program


def build_learned_weighting_fed_avg(
    model_fn: fm.ModelArg,
    client_optimizer_fn: Optional[fm.OptimizerArg] = None,
    server_optimizer_fn: Optional[fm.OptimizerArg] = None,
    *,
    hyper_optimizer_fn: Optional[fm.OptimizerArg] = None,
    initial_weight_exponent: float = 0.0,
    metrics_aggregator: Optional[fm.MetricsAggregator] = None,
    tangent_decay: float = 0.9,
    post_update_loss: str = 'first_batch',
) -> tff.learning.templates.LearningProcess:
  """FedAvg that learns its server learning rate and its client weighting.

  Client i's update is averaged with weight `n_i ** exponent`; both
  `exponent` and `log(server learning rate)` follow their hypergradients,
  in forward mode with two tangent directions. The weighted mean is inside
  the differentiated program, so its tangent (d update / d exponent,
  model-sized) is aggregated in the same message as the update and kept in
  the state for the next round's hypergradient:

    round t:   clients get <w_t, dw_t/d(log_lr, exponent)>  (one broadcast)
               clients send <n^e delta, d(n^e delta)/de, ...> and <loss, dloss>
    server:    new update and its tangent; both hyperparameters step;
               dw_t/d(log_lr, exponent) is kept, decayed, for the next round.

  Per client this costs 3 model-sized messages each way (value plus two
  tangent directions) and stays one round trip. The aggregation must be
  differentiable in the weights, so it is tff_fad's weighted mean: there is
  no `model_aggregator` or `client_weighting` argument (the weighting is
  what is learned).

  Args:
    model_fn: As in `build_hypergradient_fed_avg`.
    client_optimizer_fn: As in `build_hypergradient_fed_avg`.
    server_optimizer_fn: As in `build_hypergradient_fed_avg`.
    hyper_optimizer_fn: Optimizer of `(log lr, exponent)`; default
      `default_hyper_optimizer()`.
    initial_weight_exponent: Starting exponent (0: uniform weights).
    metrics_aggregator: As in `build_hypergradient_fed_avg`.
    tangent_decay: In [0, 1): how much of dw/d(log_lr, exponent) carries
      over to the next round, as in `build_hypergradient_fed_avg`.
    post_update_loss: As in `build_hypergradient_fed_avg`.

  Returns:
    A `tff.learning.templates.LearningProcess` shaped as
    `build_hypergradient_fed_avg`'s; `hyperparameters` adds
    `weight_exponent` and `hypergradient_weight_exponent`, and the hparams'
    `finalizer` adds `weight_exponent` (a new exponent weighs the next
    round's updates; the pending one keeps its weights).
  """
  model, client_optimizer, server_optimizer, hyper_optimizer = (
      _resolve_common('build_learned_weighting_fed_avg', model_fn,
                      client_optimizer_fn, server_optimizer_fn,
                      hyper_optimizer_fn, tangent_decay, post_update_loss))
  lr0 = initial_server_learning_rate(server_optimizer)
  if not np.isfinite(initial_weight_exponent):
    raise ValueError('initial_weight_exponent must be finite, got '
                     f'{initial_weight_exponent!r}.')
  round_program = build_learned_weighting_round_program(
      model, client_optimizer, post_update_loss)
  directions = 2  # d/d log_lr and d/d exponent.
  differentiated = fad.jvp(round_program,
                           wrt=('model_weights', 'log_lr', 'exponent'),
                           num_directions=directions, has_aux=True)
  log_lr0 = float(np.log(lr0))
  scalar = tf.TensorSpec([], tf.float32)

  @tff.tensorflow.computation
  def initial_values():
    zeros = _zeros_like_trainable(model)
    return fm.initial_model_weights(model), collections.OrderedDict(
        log_lr=tf.constant(log_lr0, tf.float32),
        weight_exponent=tf.constant(initial_weight_exponent, tf.float32),
        pending=zeros,
        # d pending / d exponent; pending never depends on the current rate.
        pending_tangent=zeros,
        # d(stored model) / d (log_lr, exponent): the earlier rounds' part.
        model_tangent=_zeros_like_trainable(model, [directions]),
        hyper_optimizer=hyper_optimizer.initialize((scalar, scalar)))

  @tff.federated_computation
  def initialize():
    values = tff.federated_eval(initial_values, tff.SERVER)
    return _learning_algorithm_state(
        values[0], tff.federated_value((), tff.SERVER), values[1])

  state_type = initialize.type_signature.result
  state_member = state_type.member

  @tff.tensorflow.computation(state_member)
  def round_inputs(state):
    finalizer = state.finalizer
    pair = _as_pair(state.global_model_weights)
    lr = tf.exp(finalizer['log_lr'])
    # Direction 0 moves log_lr, direction 1 the exponent. The stored model
    # m_t = w_{t-1} - lr_t * pending_t moves with the exponent through the
    # pending update: dm_t/de = decay * dw_{t-1}/de - lr_t * dpending_t/de.
    model_tangent = (
        tuple(tangent_decay * t - lr * tf.stack([tf.zeros_like(dp), dp])
              for t, dp in zip(finalizer['model_tangent'],
                               finalizer['pending_tangent'])),
        tuple(tf.zeros([directions] + t.shape.as_list(), t.dtype)
              for t in pair[1]))
    return pair, model_tangent, tf.constant([1.0, 0.0]), tf.constant(
        [0.0, 1.0])

  @tff.tensorflow.computation
  def server_update(finalizer, weights, new_pending, pending_tangent,
                    hypergradient):
    (new_pending, pending_tangent), non_finite = fm.zero_if_non_finite(
        (new_pending, pending_tangent))
    hyper_state, (log_lr, exponent) = _hyper_step(
        hyper_optimizer, finalizer['hyper_optimizer'],
        (finalizer['log_lr'], finalizer['weight_exponent']),
        (hypergradient[0], hypergradient[1]))
    lr = tf.exp(finalizer['log_lr'])
    new_model = _next_model(weights, log_lr, new_pending)
    new_finalizer = collections.OrderedDict(
        log_lr=log_lr, weight_exponent=exponent, pending=new_pending,
        pending_tangent=tuple(t[1] for t in pending_tangent),
        # d w_t / d (log_lr, exponent), the next round's d(stored model).
        model_tangent=tuple(
            tangent_decay * t - lr * tf.stack([p, dp]) for t, p, dp in zip(
                finalizer['model_tangent'], finalizer['pending'],
                finalizer['pending_tangent'])),
        hyper_optimizer=hyper_state)
    hyperparameters = collections.OrderedDict(
        server_learning_rate=lr,
        weight_exponent=finalizer['weight_exponent'],
        hypergradient=hypergradient[0],
        hypergradient_weight_exponent=hypergradient[1])
    return new_model, new_finalizer, non_finite, hyperparameters

  @tff.federated_computation(
      state_type, tff.FederatedType(fm.data_type(model), tff.CLIENTS))
  def next_fn(state, client_data):
    inputs = tff.federated_map(round_inputs, state)
    finalizer = state.finalizer
    (loss, new_pending), (d_loss, d_pending), (weights, client_outputs) = (
        differentiated(inputs[0], finalizer['log_lr'], finalizer['pending'],
                       finalizer['log_lr'], finalizer['weight_exponent'],
                       client_data, inputs[1],
                       inputs[2], inputs[3]))
    train = fm.aggregate_metrics(metrics_aggregator, model,
                                 client_outputs['metrics'])
    updated = tff.federated_map(server_update, (
        finalizer, weights, new_pending, d_pending, d_loss))
    new_state = _learning_algorithm_state(
        updated[0], tff.federated_value((), tff.SERVER), updated[1])
    hyperparameters = updated[3]
    metrics = _round_metrics(
        train, tff.federated_value((), tff.SERVER), updated[2],
        collections.OrderedDict(
            server_learning_rate=hyperparameters['server_learning_rate'],
            weight_exponent=hyperparameters['weight_exponent'],
            hypergradient=hyperparameters['hypergradient'],
            hypergradient_weight_exponent=(
                hyperparameters['hypergradient_weight_exponent']),
            post_update_loss=loss))
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)

  get_model_weights, set_model_weights = _model_accessors(state_member, model)
  learned = dict(_LEARNING_RATE_HPARAM)
  learned['weight_exponent'] = ('weight_exponent',
                                lambda v: tf.cast(v, tf.float32), tf.identity)
  get_hparams, set_hparams = _hparams_accessors(state_member, learned)
  return tff.learning.templates.LearningProcess(
      initialize, next_fn, get_model_weights, set_model_weights,
      get_hparams_fn=get_hparams, set_hparams_fn=set_hparams)
