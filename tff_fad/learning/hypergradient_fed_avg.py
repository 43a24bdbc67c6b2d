"""FedAvg that learns its own server learning rate with Federated AD.

The server keeps `log_lr` in its state. Round t starts from the last model
`base` and the pending update `delta` (the clients' averaged update from the
previous round) and forms the model the clients train from:

    w_t = base - exp(log_lr) * delta                    (server)

The hypergradient of the post-update loss L(w_t) = mean_i L_i(w_t) w.r.t.
`log_lr` measures whether the server steps were too long or too short;
a hyper-optimizer then moves `log_lr` (hypergradient descent, Baydin et al.
2018, in the federated form of Rush, Charles & Garrett, "Federated Automatic
Differentiation", 2024).

Which steps count is `tangent_decay` (g). The server carries T = dw/dlog_lr
from round to round:

    dw_t/dlog_lr = g * T_{t-1} - exp(log_lr) * delta     (server, free)

g = 0 is the greedy one-step hypergradient: only the last step moves with
the rate. It is biased towards short steps (Wu et al. 2018, "Understanding
short-horizon bias"): from a low start it stops climbing early. g > 0 also
moves the earlier steps, with weight g^k for the step k rounds back, so the
derivative answers "would a larger rate over the last ~1/(1-g) rounds have
helped?". The carry treats the clients' updates as fixed (d delta/dw = 0):
differentiating local training would cost a model-sized tangent upload and
forward-over-reverse passes on every client, while T costs no communication
(the broadcast carries a tangent of w_t either way).

The round is one tff_fad program (`round_program`), differentiated w.r.t.
`(base, log_lr)` with the carried tangent as base's direction:

  * mode='forward': the broadcast carries <w_t, dw_t/dlog_lr> in one message;
    each client returns <loss, d loss> (two scalars) with its model update,
    so the hypergradient rides on the round's own broadcast and upload: no
    extra round trip, +1 model-size downlink and +1 scalar uplink per client.
  * mode='reverse': a second sweep broadcasts the cotangent and each client
    uploads the gradient of its loss at w_t (model-size uplink) in a second
    round trip; the server contracts it with dw_t/dlog_lr.
  `communication_cost(process.next, n)` reports both, from the computation.

Local training starts from `stop_gradient(w_t)`, so training never has to be
differentiated. Client data are datasets, so the post-update loss brings
per-batch derivative rules (`with_derivatives`).

The model-update aggregation is any `tff.aggregators` factory, applied
outside the differentiated program because nothing differentiates through it.
"""

import collections
from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad import core as fad

AggregationFactory = Union[tff.aggregators.UnweightedAggregationFactory,
                           tff.aggregators.WeightedAggregationFactory]
MODES = ('forward', 'reverse')


def _check_args(mode, initial_server_learning_rate, tangent_decay):
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
  if not initial_server_learning_rate > 0:
    raise ValueError('initial_server_learning_rate must be > 0, got '
                     f'{initial_server_learning_rate!r}.')
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


def _batch_loss_sum(model, weights, batch):
  """Summed (not mean) loss of a batch and its example count (float32)."""
  logits = model.predict_on_batch(weights, batch['x'], training=False)
  n = tf.cast(tf.shape(batch['y'])[0], tf.float32)
  return model.loss(logits, batch['y']) * n, n


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


def build_client_update(model: tff.learning.models.FunctionalModel,
                        client_optimizer: tff.learning.optimizers.Optimizer):
  """`(model_weights, dataset) -> OrderedDict(update, weight, loss_sum)`.

  One pass of `client_optimizer` over the dataset (repeat/batch it for more
  epochs). `update` is `initial - final` trainable weights.
  """

  def client_update(weights, dataset):
    trainable, non_trainable = weights
    specs = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), trainable)
    optimizer_state = client_optimizer.initialize(specs)

    def step(carry, batch):
      local, opt_state, loss_total, count = carry
      with tf.GradientTape() as tape:
        tape.watch(local)
        loss, n = _batch_loss_sum(model, (local, non_trainable), batch)
        mean_loss = loss / tf.maximum(n, 1.0)
      grads = tape.gradient(mean_loss, local)
      opt_state, local = client_optimizer.next(opt_state, local, grads)
      return local, opt_state, loss_total + loss, count + n

    local, _, loss_total, count = dataset.reduce(
        (trainable, optimizer_state, 0.0, 0.0), step)
    update = tf.nest.map_structure(tf.subtract, trainable, local)
    return collections.OrderedDict(update=update, weight=count,
                                   loss_sum=loss_total)

  return client_update


def _type_of(values) -> tff.Type:
  """The TFF type of a structure of numpy arrays (e.g. initial weights)."""
  return tff.types.tensorflow_to_type(tf.nest.map_structure(
      lambda a: tf.TensorSpec(np.shape(a), tf.as_dtype(np.asarray(a).dtype)),
      values))


def _current_model(base, log_lr, pending):
  """w_t = base - exp(log_lr) * pending (trainable weights only)."""
  lr = tf.exp(log_lr)
  trainable = tf.nest.map_structure(lambda b, p: b - lr * p, base[0],
                                    pending)
  return (trainable, base[1])


def build_round_program(model, client_optimizer):
  """The differentiable part of one round, as a tff_fad program.

  `(base@S, log_lr@S, pending@S, data{Seq}@C) -> (post_update_loss@S,
  aux=(w_t@S, {client outputs}@CLIENTS))`.
  """
  weights_type = _type_of(model.initial_weights)
  trainable_type = weights_type[0]
  post_update_loss = build_post_update_loss(model)
  client_update = build_client_update(model, client_optimizer)
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))

  @fad.federated_computation(
      tff.FederatedType(weights_type, tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      tff.FederatedType(trainable_type, tff.SERVER),
      tff.FederatedType(data_type, tff.CLIENTS))
  def round_program(base, log_lr, pending, data):
    weights = fad.federated_apply(_current_model, (base, log_lr, pending))
    at_clients = fad.federated_broadcast(weights)
    loss_and_count = fad.federated_sum(
        fad.federated_map(post_update_loss, (at_clients, data)))
    loss = fad.federated_apply(lambda t: t[0] / tf.maximum(t[1], 1.0),
                               loss_and_count)
    client_outputs = fad.federated_map(
        client_update, (fad.stop_gradient(at_clients), data))
    return loss, (weights, client_outputs)

  return round_program


def _train_metrics(client_outputs):
  """Example-weighted training loss of the round (federated context)."""
  totals_type = collections.OrderedDict(loss_sum=np.float32,
                                        num_examples=np.float32)

  @tff.tensorflow.computation(totals_type)
  def finalize(totals):
    return collections.OrderedDict(
        loss=totals['loss_sum'] / tf.maximum(totals['num_examples'], 1.0),
        num_examples=totals['num_examples'])

  totals = tff.federated_sum(tff.federated_zip(collections.OrderedDict(
      loss_sum=client_outputs['loss_sum'],
      num_examples=client_outputs['weight'])))
  return tff.federated_map(finalize, totals)


def _decayed_base_tangent(state, tangent_decay, num_directions=None):
  """The tangent of `base` (the last round's model) fed to this round.

  `tangent_decay * state['base_tangent']` for the trainable weights, zeros
  for the non-trainable ones (with a leading `num_directions` axis if set).
  """
  leading = [] if num_directions is None else [num_directions]
  return (tf.nest.map_structure(lambda t: tangent_decay * t,
                                state['base_tangent']),
          tf.nest.map_structure(
              lambda t: tf.zeros(leading + t.shape.as_list(), t.dtype),
              state['base'][1]))


def _model_weights_accessors(state_member, initial_weights):
  """`get_model_weights` / `set_model_weights` of a learning process.

  The state holds `base`, `log_lr` and `pending` (the current model is
  `base - exp(log_lr) * pending`); setting weights clears `pending` and the
  tangents (`pending_tangent`, `base_tangent`): the new model has no history.
  The rest of the state is kept.
  """

  @tff.tensorflow.computation(state_member)
  def get_model_weights(state):
    trainable, non_trainable = _current_model(
        state['base'], state['log_lr'], state['pending'])
    return tff.learning.models.ModelWeights(trainable=trainable,
                                            non_trainable=non_trainable)

  @tff.tensorflow.computation(
      state_member,
      _type_of(tff.learning.models.ModelWeights(*initial_weights)))
  def set_model_weights(state, model_weights):
    new_state = collections.OrderedDict(state)
    new_state['base'] = (tuple(model_weights.trainable),
                         tuple(model_weights.non_trainable))
    for key in ('pending', 'pending_tangent', 'base_tangent'):
      if key in new_state:
        new_state[key] = tf.nest.map_structure(tf.zeros_like, state[key])
    return new_state

  return get_model_weights, set_model_weights


def build_hypergradient_fed_avg(
    model: tff.learning.models.FunctionalModel,
    *,
    client_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    initial_server_learning_rate: float = 1.0,
    hyper_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    mode: str = 'forward',
    model_aggregator: Optional[AggregationFactory] = None,
    tangent_decay: float = 0.9,
) -> tff.learning.templates.LearningProcess:
  """FedAvg whose server learning rate is learned by Federated AD.

  `next` has type `(state@SERVER, {Sequence[batch]}@CLIENTS) ->
  <state@SERVER, metrics@SERVER>`; one round is one broadcast of the model
  (with its tangent in forward mode) and one upload of model updates (with
  the loss and its derivative); see the module docstring for the modes.

  Args:
    model: A `tff.learning.models.FunctionalModel`.
    client_optimizer: Local optimizer (default SGD, learning rate 0.1).
    initial_server_learning_rate: Starting server learning rate (> 0).
    hyper_optimizer: Optimizer of `log(server learning rate)`; default
      `default_hyper_optimizer()`.
    mode: 'forward' or 'reverse' accumulation of the hypergradient.
    model_aggregator: A `tff.aggregators` factory for the model updates;
      weighted factories get the client example counts. Default: weighted
      mean.
    tangent_decay: In [0, 1): how much of dw/dlog_lr carries over to the
      next round (module docstring). 0 is the greedy one-step
      hypergradient; the default 0.9 looks back about 10 rounds.

  Returns:
    A `tff.learning.templates.LearningProcess`. Its metrics hold
    `server_learning_rate` (used this round), `hypergradient`
    (d loss / d log lr), `post_update_loss` (clients' loss at the round's
    model, before local training) and `train` loss.
  """
  _check_args(mode, initial_server_learning_rate, tangent_decay)
  client_optimizer = client_optimizer or tff.learning.optimizers.build_sgdm(
      learning_rate=0.1)
  hyper_optimizer = hyper_optimizer or default_hyper_optimizer()
  model_aggregator = model_aggregator or tff.aggregators.MeanFactory()

  round_program = build_round_program(model, client_optimizer)
  # d loss/d log_lr = dL/dw . (decay * d base/d log_lr - lr * pending): the
  # derivative w.r.t. `base` carries the earlier rounds' steps.
  if mode == 'forward':
    differentiated = fad.jvp(round_program, wrt=('base', 'log_lr'),
                             has_aux=True)
  else:
    differentiated = fad.value_and_grad(
        round_program, wrt=('base', 'log_lr'), mode=mode, has_aux=True)

  weights_type = _type_of(model.initial_weights)
  trainable_type = weights_type[0]
  weight_count_type = tff.TensorType(np.float32)
  if isinstance(model_aggregator, tff.aggregators.WeightedAggregationFactory):
    aggregation = model_aggregator.create(trainable_type, weight_count_type)
  else:
    aggregation = model_aggregator.create(trainable_type)
  weighted = isinstance(model_aggregator,
                        tff.aggregators.WeightedAggregationFactory)
  scalar_spec = tf.TensorSpec([], tf.float32)
  initial_weights = model.initial_weights
  log_lr0 = float(np.log(initial_server_learning_rate))

  @tff.tensorflow.computation
  def initial_server_values():
    zeros = tf.nest.map_structure(
        lambda t: tf.zeros(tf.shape(t), tf.float32), initial_weights[0])
    return collections.OrderedDict(
        base=tf.nest.map_structure(tf.constant, initial_weights),
        log_lr=tf.constant(log_lr0, tf.float32),
        pending=zeros,
        base_tangent=zeros,
        hyper_optimizer=hyper_optimizer.initialize(scalar_spec))

  @tff.federated_computation
  def initialize():
    values = tff.federated_eval(initial_server_values, tff.SERVER)
    return tff.federated_zip(collections.OrderedDict(
        base=values['base'], log_lr=values['log_lr'],
        pending=values['pending'], base_tangent=values['base_tangent'],
        hyper_optimizer=values['hyper_optimizer'],
        aggregator=aggregation.initialize()))

  state_type = initialize.type_signature.result
  data_type = tff.FederatedType(
      tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec)),
      tff.CLIENTS)

  state_member = state_type.member

  @tff.tensorflow.computation(state_member)
  def base_tangent_in(state):
    return _decayed_base_tangent(state, tangent_decay)

  @tff.tensorflow.computation
  def hypergradient_of(gradients, base_tangent):
    (d_base, _), d_log_lr = gradients
    return d_log_lr + sum(
        tf.reduce_sum(g * t) for g, t in zip(tf.nest.flatten(d_base),
                                             tf.nest.flatten(base_tangent[0])))

  @tff.tensorflow.computation
  def server_update(hyper_state, log_lr, hypergradient, base_tangent,
                    pending):
    # A non-finite hypergradient (diverged round) must not poison the rate.
    hypergradient = tf.where(tf.math.is_finite(hypergradient), hypergradient,
                             tf.zeros_like(hypergradient))
    new_hyper_state, new_log_lr = hyper_optimizer.next(hyper_state, log_lr,
                                                       hypergradient)
    # d w_t / d log_lr, the next round's d base / d log_lr.
    lr = tf.exp(log_lr)
    model_tangent = tf.nest.map_structure(lambda t, p: t - lr * p,
                                          base_tangent[0], pending)
    return new_hyper_state, new_log_lr, model_tangent

  @tff.tensorflow.computation(np.float32)
  def learning_rate(log_lr):
    return tf.exp(log_lr)

  @tff.federated_computation(state_type, data_type)
  def next_fn(state, data):
    base_tangent = tff.federated_map(base_tangent_in, state)
    if mode == 'forward':
      loss, hypergradient, (weights, client_outputs) = differentiated(
          state['base'], state['log_lr'], state['pending'], data,
          base_tangent, tff.federated_value(np.float32(1.0), tff.SERVER))
    else:
      (loss, (weights, client_outputs)), gradients = differentiated(
          state['base'], state['log_lr'], state['pending'], data)
      hypergradient = tff.federated_map(hypergradient_of, (
          tff.federated_zip(gradients), base_tangent))
    if weighted:
      aggregate = aggregation.next(state['aggregator'],
                                   client_outputs['update'],
                                   client_outputs['weight'])
    else:
      aggregate = aggregation.next(state['aggregator'],
                                   client_outputs['update'])
    hyper = tff.federated_map(server_update, (
        state['hyper_optimizer'], state['log_lr'], hypergradient,
        base_tangent, state['pending']))
    new_state = tff.federated_zip(collections.OrderedDict(
        base=weights, log_lr=hyper[1], pending=aggregate.result,
        base_tangent=hyper[2], hyper_optimizer=hyper[0],
        aggregator=aggregate.state))
    metrics = tff.federated_zip(collections.OrderedDict(
        server_learning_rate=tff.federated_map(learning_rate, state['log_lr']),
        hypergradient=hypergradient,
        post_update_loss=loss,
        train=_train_metrics(client_outputs),
        aggregator=aggregate.measurements))
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)

  get_model_weights, set_model_weights = _model_weights_accessors(
      state_member, initial_weights)
  return tff.learning.templates.LearningProcess(
      initialize, next_fn, get_model_weights, set_model_weights)


def build_learned_weighting_round_program(model, client_optimizer):
  """A round whose update is a weighted mean with learnable client weights.

  Client i's aggregation weight is `n_i ** exponent` (n_i its example count):
  exponent 0 is the uniform mean, 1 the example-weighted mean FedAvg uses.
  `(base@S, log_lr@S, pending@S, exponent@S, data{Seq}@C) ->
  ((post_update_loss@S, new_pending@S), aux=(w_t@S, {client outputs}@C))`.
  """
  weights_type = _type_of(model.initial_weights)
  post_update_loss = build_post_update_loss(model)
  client_update = build_client_update(model, client_optimizer)
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))

  def aggregation_weight(count, exponent):
    return tf.exp(exponent * tf.math.log(tf.maximum(count, 1.0)))

  @fad.federated_computation(
      tff.FederatedType(weights_type, tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      tff.FederatedType(weights_type[0], tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      tff.FederatedType(data_type, tff.CLIENTS))
  def round_program(base, log_lr, pending, exponent, data):
    weights = fad.federated_apply(_current_model, (base, log_lr, pending))
    at_clients = fad.federated_broadcast(weights)
    loss_and_count = fad.federated_sum(
        fad.federated_map(post_update_loss, (at_clients, data)))
    loss = fad.federated_apply(lambda t: t[0] / tf.maximum(t[1], 1.0),
                               loss_and_count)
    client_outputs = fad.federated_map(
        client_update, (fad.stop_gradient(at_clients), data))
    mixing = fad.federated_map(
        aggregation_weight,
        (client_outputs['weight'], fad.federated_broadcast(exponent)))
    new_pending = fad.federated_mean(client_outputs['update'], weight=mixing)
    return (loss, new_pending), (weights, client_outputs)

  return round_program


def build_learned_weighting_fed_avg(
    model: tff.learning.models.FunctionalModel,
    *,
    client_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    initial_server_learning_rate: float = 1.0,
    initial_weight_exponent: float = 0.0,
    hyper_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    tangent_decay: float = 0.9,
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
  differentiable in the weights, so it is tff_fad's weighted mean rather than
  an arbitrary `tff.aggregators` factory.

  Args:
    model: A `tff.learning.models.FunctionalModel`.
    client_optimizer: Local optimizer (default SGD, learning rate 0.1).
    initial_server_learning_rate: Starting server learning rate (> 0).
    initial_weight_exponent: Starting exponent (0: uniform weights).
    hyper_optimizer: Optimizer of `(log lr, exponent)`; default
      `default_hyper_optimizer()`.
    tangent_decay: In [0, 1): how much of dw/d(log_lr, exponent) carries
      over to the next round, as in `build_hypergradient_fed_avg`.

  Returns:
    A `tff.learning.templates.LearningProcess`; metrics add
    `weight_exponent` and `hypergradient` becomes a pair.
  """
  _check_args('forward', initial_server_learning_rate, tangent_decay)
  client_optimizer = client_optimizer or tff.learning.optimizers.build_sgdm(
      learning_rate=0.1)
  hyper_optimizer = hyper_optimizer or default_hyper_optimizer()
  round_program = build_learned_weighting_round_program(model,
                                                        client_optimizer)
  directions = 2  # d/d log_lr and d/d exponent.
  differentiated = fad.jvp(round_program,
                           wrt=('base', 'log_lr', 'pending', 'exponent'),
                           num_directions=directions, has_aux=True)

  initial_weights = model.initial_weights
  log_lr0 = float(np.log(initial_server_learning_rate))
  hyper_spec = (tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32))

  @tff.tensorflow.computation
  def initial_state():
    zeros = tf.nest.map_structure(
        lambda t: tf.zeros(tf.shape(t), tf.float32), initial_weights[0])
    return collections.OrderedDict(
        base=tf.nest.map_structure(tf.constant, initial_weights),
        log_lr=tf.constant(log_lr0, tf.float32),
        pending=zeros,
        # d pending / d exponent; pending never depends on the current rate.
        pending_tangent=zeros,
        # d base / d (log_lr, exponent): the earlier rounds' part.
        base_tangent=tf.nest.map_structure(
            lambda z: tf.stack([z, z]), zeros),
        exponent=tf.constant(initial_weight_exponent, tf.float32),
        hyper_optimizer=hyper_optimizer.initialize(hyper_spec))

  @tff.federated_computation
  def initialize():
    return tff.federated_eval(initial_state, tff.SERVER)

  state_type = initialize.type_signature.result
  state_member = state_type.member
  data_type = tff.FederatedType(
      tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec)),
      tff.CLIENTS)

  @tff.tensorflow.computation(state_member)
  def input_tangents(state):
    # Direction 0 moves log_lr, direction 1 moves the exponent.
    base_tangent = _decayed_base_tangent(state, tangent_decay, directions)
    pending_tangent = tf.nest.map_structure(
        lambda t: tf.stack([tf.zeros_like(t), t]), state['pending_tangent'])
    return (base_tangent, tf.constant([1.0, 0.0]), pending_tangent,
            tf.constant([0.0, 1.0]))

  @tff.tensorflow.computation
  def server_update(state, new_pending, pending_tangent, hypergradient,
                    base, base_tangent):
    hypergradient = tf.where(tf.math.is_finite(hypergradient), hypergradient,
                             tf.zeros_like(hypergradient))
    hyper_state, (log_lr, exponent) = hyper_optimizer.next(
        state['hyper_optimizer'], (state['log_lr'], state['exponent']),
        (hypergradient[0], hypergradient[1]))
    # d w_t / d (log_lr, exponent), the next round's d base.
    lr = tf.exp(state['log_lr'])
    model_tangent = tf.nest.map_structure(
        lambda t, p, dp: t - lr * tf.stack([p, dp]), base_tangent[0],
        state['pending'], state['pending_tangent'])
    new_state = collections.OrderedDict(
        base=base, log_lr=log_lr, pending=new_pending,
        pending_tangent=tf.nest.map_structure(lambda t: t[1],
                                              pending_tangent),
        base_tangent=model_tangent,
        exponent=exponent, hyper_optimizer=hyper_state)
    metrics = collections.OrderedDict(
        server_learning_rate=tf.exp(state['log_lr']),
        weight_exponent=state['exponent'],
        hypergradient_log_lr=hypergradient[0],
        hypergradient_exponent=hypergradient[1])
    return new_state, metrics

  @tff.federated_computation(state_type, data_type)
  def next_fn(state, data):
    tangents = tff.federated_map(input_tangents, state)
    (loss, new_pending), (d_loss, d_pending), (weights, client_outputs) = (
        differentiated(state['base'],
                       state['log_lr'], state['pending'], state['exponent'],
                       data, tangents[0], tangents[1], tangents[2],
                       tangents[3]))
    updated = tff.federated_map(server_update, (
        state, new_pending, d_pending, d_loss, weights, tangents[0]))
    metrics = tff.federated_zip(collections.OrderedDict(
        hyper=updated[1], post_update_loss=loss,
        train=_train_metrics(client_outputs)))
    return tff.learning.templates.LearningProcessOutput(updated[0], metrics)

  get_model_weights, set_model_weights = _model_weights_accessors(
      state_member, initial_weights)
  return tff.learning.templates.LearningProcess(
      initialize, next_fn, get_model_weights, set_model_weights)
