"""BAFFLE: federated training from forward passes only (no client backprop).

Feng et al., "Does Federated Learning Really Need Backpropagation?" (2023).
Each round the server broadcasts the model `w` and a round seed. Every client
regenerates the same K directions `z_k ~ N(0, I)` from the seed with
stateless random ops, and uploads only K float32 scores:

  forward:  d_k = (L(w + sigma z_k) - L(w)) / sigma
  central:  d_k = (L(w + sigma z_k) - L(w - sigma z_k)) / (2 sigma)
  jvp:      d_k = <grad L(w), z_k>, exactly, by forward-mode AD
            (`tf.autodiff.ForwardAccumulator`); an extension beyond the paper.

The server aggregates the K-vectors (any `tff.aggregators` factory: the upload
is tiny and linear, so secure sums and DP fit), regenerates the same z_k and
rebuilds `g = (1/K) sum_k mean(d_k) z_k` (with delta_k = sigma z_k this is the
paper's `(1/K) sum_k [dL_k / sigma] (delta_k / sigma)`), optionally clips it
elementwise (the official code clamps to 0.3), and applies a server optimizer
(Adam 1e-2 by default, as in the official code), optionally keeping an EMA of
the weights for evaluation.

`mode='one_epoch'` is the paper's second mode (FedAvg-like): each client takes
one forward-only SGD step per local batch with the same estimator, and uploads
its model delta; the server applies its optimizer to the mean delta.

Client memory stays close to inference: the K perturbed models are never held
at once; a `tf.while_loop` regenerates z_k from `(seed, k)` at each iteration
(`parallel_perturbations` lets a few iterations overlap, trading memory for
speed). Server and client share `perturbation` so they agree bit for bit.
"""

import collections
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

ESTIMATORS = ('forward', 'central', 'jvp')
MODES = ('fedsgd', 'one_epoch')

AggregationFactory = Union[tff.aggregators.UnweightedAggregationFactory,
                           tff.aggregators.WeightedAggregationFactory]
Tensors = Sequence[tf.Tensor]
LossFn = Callable[[Tensors], tf.Tensor]


class BaffleState(NamedTuple):
  """Server state of the BAFFLE learning process (all `@SERVER`).

  Attributes:
    global_model_weights: The `tff.learning.models.ModelWeights` trained.
    round_num: int64 round counter; the round seed is `(seed, round_num)`.
    aggregator: State of the aggregation process.
    optimizer: State of the server optimizer.
    ema_weights: EMA of the trainable weights, or `()` without EMA.
  """

  global_model_weights: Any
  round_num: Any
  aggregator: Any
  optimizer: Any
  ema_weights: Any


def validate_hparams(num_perturbations: int, sigma: float, estimator: str,
                     mode: str = 'fedsgd', clip_value: Optional[float] = None,
                     ema_decay: Optional[float] = None,
                     client_learning_rate: float = 0.1,
                     parallel_perturbations: int = 1) -> None:
  """Raises `ValueError` naming the first bad argument."""
  if not isinstance(num_perturbations, (int, np.integer)) or (
      num_perturbations <= 0):
    raise ValueError(
        f'num_perturbations (K) must be a positive int, got {num_perturbations!r}.')
  if not sigma > 0:
    raise ValueError(f'sigma must be > 0, got {sigma!r}.')
  if estimator not in ESTIMATORS:
    raise ValueError(f'estimator must be one of {ESTIMATORS}, got {estimator!r}.')
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
  if clip_value is not None and not clip_value > 0:
    raise ValueError(f'clip_value must be > 0 or None, got {clip_value!r}.')
  if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1) or None, got {ema_decay!r}.')
  if not client_learning_rate > 0:
    raise ValueError(
        f'client_learning_rate must be > 0, got {client_learning_rate!r}.')
  if parallel_perturbations < 1:
    raise ValueError('parallel_perturbations must be >= 1, got '
                     f'{parallel_perturbations!r}.')


def perturbation(shapes: Sequence[Sequence[int]], seed: tf.Tensor,
                 k: tf.Tensor) -> list[tf.Tensor]:
  """Returns the direction z_k, standard normal, shaped like the weights.

  A pure function of `(seed, k)`: clients and the server call it to get the
  same values without sending them. One flat draw per k, then split, so the
  values do not depend on how the weights are grouped into tensors.

  Args:
    shapes: Shapes of the trainable weights.
    seed: int64 `[2]` round seed.
    k: int32 index of the direction.

  Returns:
    float32 tensors with `shapes`.
  """
  sizes = [int(np.prod(s)) for s in shapes]
  k_seed = tf.random.experimental.stateless_fold_in(seed, k)
  flat = tf.random.stateless_normal([sum(sizes)], k_seed, dtype=tf.float32)
  return [tf.reshape(t, s) for t, s in zip(tf.split(flat, sizes), shapes)]


def directional_derivative(loss_fn: LossFn, weights: Tensors,
                           tangents: Tensors) -> tuple[tf.Tensor, tf.Tensor]:
  """Returns `(L(w), <grad L(w), tangents>)` by forward-mode AD.

  The federated AD core's forward mode (tff_fad.core) computes the same
  JVP for federated programs; this is the local, one-client case.

  Note: TF 2.14's `ForwardAccumulator` computes the JVP of ops without a
  native forward rule by transposing their VJP, op by op, as the forward
  pass runs. No reverse pass over the network is made and no activations are
  kept for one, but the graph does contain gradient kernels (e.g.
  `Conv2DBackpropInput`) used as linear maps.
  """
  # Fresh identities: the accumulator must watch the tensors that `loss_fn`
  # actually consumes, not outer tensors captured into a loop body.
  watched = [tf.identity(w) for w in weights]
  with tf.autodiff.ForwardAccumulator(watched, list(tangents)) as acc:
    loss = loss_fn(watched)
  return loss, acc.jvp(loss, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def estimate_scores(loss_fn: LossFn, weights: Tensors, seed: tf.Tensor,
                    num_perturbations: int, sigma: float, estimator: str,
                    parallel_perturbations: int = 1
                    ) -> tuple[tf.Tensor, tf.Tensor]:
  """Computes a client's K scalar scores d_k with forward passes only.

  Args:
    loss_fn: Maps trainable weights to the scalar minibatch loss.
    weights: The broadcast trainable weights `w`.
    seed: int64 `[2]` round seed.
    num_perturbations: K.
    sigma: Perturbation scale (unused by `'jvp'`).
    estimator: `'forward'`, `'central'` or `'jvp'`.
    parallel_perturbations: Loop iterations allowed to run at once (1 keeps a
      single perturbed model alive).

  Returns:
    `(scores, loss)`: float32 `[K]` and the loss at `w` (for `'central'`, the
    mean of the two perturbed losses, equal to it up to O(sigma^2)).
  """
  shapes = [w.shape for w in weights]
  base_loss = loss_fn(weights) if estimator == 'forward' else None

  def score(k):
    z = perturbation(shapes, seed, k)
    if estimator == 'jvp':
      loss, jvp = directional_derivative(loss_fn, weights, z)
      return jvp, loss
    plus = loss_fn([w + sigma * t for w, t in zip(weights, z)])
    if estimator == 'forward':
      return (plus - base_loss) / sigma, base_loss
    minus = loss_fn([w - sigma * t for w, t in zip(weights, z)])
    return (plus - minus) / (2.0 * sigma), (plus + minus) / 2.0

  def body(k, scores, loss_sum):
    d, loss = score(k)
    return k + 1, scores.write(k, d), loss_sum + loss

  _, scores, loss_sum = tf.while_loop(
      lambda k, *_: k < num_perturbations, body,
      (tf.constant(0), tf.TensorArray(tf.float32, size=num_perturbations),
       tf.constant(0.0)),
      parallel_iterations=parallel_perturbations)
  loss = base_loss if base_loss is not None else loss_sum / num_perturbations
  return scores.stack(), loss


def rebuild_gradient(shapes: Sequence[Sequence[int]], seed: tf.Tensor,
                     scores: tf.Tensor) -> list[tf.Tensor]:
  """Returns `g = (1/K) sum_k scores[k] * z_k`, regenerating each z_k.

  Args:
    shapes: Shapes of the trainable weights.
    seed: int64 `[2]` round seed (the one the clients used).
    scores: float32 `[K]` aggregated scores.
  """
  num = tf.shape(scores)[0]

  def body(k, acc):
    z = perturbation(shapes, seed, k)
    return k + 1, [a + scores[k] * t for a, t in zip(acc, z)]

  _, total = tf.while_loop(
      lambda k, _: k < num, body,
      (tf.constant(0), [tf.zeros(s) for s in shapes]), parallel_iterations=1)
  return [t / tf.cast(num, tf.float32) for t in total]


def upload_bytes(client_work: tff.Computation) -> int:
  """Bytes one client uploads per round: every tensor of its result.

  Args:
    client_work: A computation from `build_client_work`.
  """

  def size(type_spec: tff.types.Type) -> int:
    if isinstance(type_spec, tff.TensorType):
      return int(np.prod(type_spec.shape)) * np.dtype(type_spec.dtype).itemsize
    return sum(size(t) for t in type_spec.children())

  return size(client_work.type_signature.result)


def round_seed(seed: int, round_num: tf.Tensor) -> tf.Tensor:
  """The int64 `[2]` seed of a round."""
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(round_num, tf.int64)])


def _batch_loss_fn(model: tff.learning.models.FunctionalModel,
                   non_trainable: Tensors, batch: Any) -> LossFn:
  if isinstance(batch, Mapping):
    x, y = batch['x'], batch['y']
  else:
    x, y = batch

  def loss_fn(trainable):
    output = model.predict_on_batch((tuple(trainable), tuple(non_trainable)), x,
                                    True)
    return model.loss(output, y)

  return loss_fn


def _num_examples(batch: Any) -> tf.Tensor:
  x = batch['x'] if isinstance(batch, Mapping) else batch[0]
  return tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)


def _model_weights_type(model: tff.learning.models.FunctionalModel):
  def spec(w):
    w = np.asarray(w)
    return tf.TensorSpec(w.shape, tf.as_dtype(w.dtype))

  return tff.types.tensorflow_to_type(
      tff.learning.models.ModelWeights(
          trainable=tuple(spec(w) for w in model.initial_weights[0]),
          non_trainable=tuple(spec(w) for w in model.initial_weights[1])))


def build_client_work(
    model: tff.learning.models.FunctionalModel,
    num_perturbations: int = 500,
    sigma: float = 1e-4,
    estimator: str = 'forward',
    mode: str = 'fedsgd',
    client_learning_rate: float = 0.1,
    clip_value: Optional[float] = 0.3,
    parallel_perturbations: int = 1,
) -> tff.Computation:
  """Builds the client's `tff.tensorflow.computation` (forward passes only).

  Its argument is `(model_weights, seed, dataset)`: the broadcast
  `ModelWeights`, the int64 `[2]` round seed and the client's batched dataset.

  * `'fedsgd'`: on the client's first batch, returns
    `OrderedDict(update=float32[K] scores, weight=examples, loss=loss at w)`.
  * `'one_epoch'`: one forward-only step per batch,
    `w <- w - client_learning_rate * clip(g_hat)`, with directions seeded by
    `(round seed, step, a fingerprint of the client's data)` so clients do
    not share directions; returns `update = w_start - w_end` (per trainable
    tensor), `weight` = examples seen, `loss` = mean loss before each step.

  Args: see `build_baffle`.

  Returns:
    The client computation; `update` is what is uploaded.
  """
  validate_hparams(num_perturbations, sigma, estimator, mode, clip_value,
                   None, client_learning_rate, parallel_perturbations)
  weights_type = _model_weights_type(model)
  data_type = tff.SequenceType(
      tff.types.tensorflow_to_type(model.input_spec))
  seed_type = tff.TensorType(np.int64, [2])

  if mode == 'fedsgd':

    @tff.tensorflow.computation(weights_type, seed_type, data_type)
    def client_fedsgd(model_weights, seed, dataset):
      batch = dataset.take(1).get_single_element()
      loss_fn = _batch_loss_fn(model, model_weights.non_trainable, batch)
      scores, loss = estimate_scores(
          loss_fn, list(model_weights.trainable), seed, num_perturbations,
          sigma, estimator, parallel_perturbations)
      return collections.OrderedDict(
          update=scores, weight=_num_examples(batch), loss=loss)

    return client_fedsgd

  @tff.tensorflow.computation(weights_type, seed_type, data_type)
  def client_one_epoch(model_weights, seed, dataset):
    # A tuple, not a list: tf.data would pack a list into one tensor.
    start = tuple(tf.identity(w) for w in model_weights.trainable)
    shapes = [w.shape for w in start]
    first = dataset.take(1).get_single_element()
    first_x = first['x'] if isinstance(first, Mapping) else first[0]
    # Different clients must explore different directions; the data differ,
    # so a fingerprint of the first batch decorrelates them reproducibly.
    salt = tf.bitcast(tf.reduce_sum(tf.nest.flatten(first_x)[0]), tf.int32)
    client_seed = tf.random.experimental.stateless_fold_in(seed, salt)

    def step(carry, batch):
      weights, step_num, loss_sum, num_examples = carry
      loss_fn = _batch_loss_fn(model, model_weights.non_trainable, batch)
      step_seed = tf.random.experimental.stateless_fold_in(
          client_seed, step_num)
      scores, loss = estimate_scores(loss_fn, list(weights), step_seed,
                                     num_perturbations, sigma, estimator,
                                     parallel_perturbations)
      grads = rebuild_gradient(shapes, step_seed, scores)
      if clip_value is not None:
        grads = [tf.clip_by_value(g, -clip_value, clip_value) for g in grads]
      weights = tuple(
          w - client_learning_rate * g for w, g in zip(weights, grads))
      n = _num_examples(batch)
      return weights, step_num + 1, loss_sum + loss * n, num_examples + n

    final, _, loss_sum, num_examples = dataset.reduce(
        (start, tf.constant(0), tf.constant(0.0), tf.constant(0.0)), step)
    return collections.OrderedDict(
        update=tuple(s - f for s, f in zip(start, final)),
        weight=num_examples,
        loss=loss_sum / tf.maximum(num_examples, 1.0))

  return client_one_epoch


def build_baffle(
    model: tff.learning.models.FunctionalModel,
    *,
    num_perturbations: int = 500,
    sigma: float = 1e-4,
    estimator: str = 'forward',
    mode: str = 'fedsgd',
    server_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[AggregationFactory] = None,
    clip_value: Optional[float] = 0.3,
    ema_decay: Optional[float] = None,
    client_learning_rate: float = 0.1,
    parallel_perturbations: int = 1,
    seed: int = 0,
) -> tff.learning.templates.LearningProcess:
  """Builds BAFFLE as a `tff.learning.templates.LearningProcess`.

  `next(state, data)` has type
  `(BaffleState@SERVER, {Sequence[batch]}@CLIENTS) -> <state@SERVER,
  metrics@SERVER>`. One round:

  1. `round_seed = (seed, round_num)@SERVER`; broadcast
     `<model_weights, round_seed>@SERVER -> @CLIENTS`.
  2. Clients run `build_client_work(...)`; `{update}@CLIENTS` is the only
     uploaded payload besides the aggregation weight and the loss metric:
     K float32 scores (`'fedsgd'`) or a model delta (`'one_epoch'`).
  3. `model_aggregator` reduces `{update}@CLIENTS -> update@SERVER`
     (weighted by examples if the factory is weighted).
  4. The server rebuilds g from the seed (`'fedsgd'`) or takes the mean delta
     (`'one_epoch'`), clips g (fedsgd only; one_epoch clips on clients), and
     applies `server_optimizer`; EMA of the weights if `ema_decay` is set.

  Why not `compose_learning_process`: there the finalizer cannot see what the
  distributor broadcast, so the server would need a second round counter kept
  in lock step with the distributor's to regenerate the directions. A single
  state with one round counter keeps the shared seed in one place.

  Args:
    model: The model; its trainable weights are perturbed.
    num_perturbations: K, the number of directions (and uploaded scalars).
    sigma: Perturbation scale of the finite differences.
    estimator: `'forward'`, `'central'` or `'jvp'` (forward-mode AD).
    mode: `'fedsgd'` (upload K scores) or `'one_epoch'` (upload deltas).
    server_optimizer: Defaults to Adam(1e-2) for `'fedsgd'` (the official
      code's MNIST setting) and SGD(1.0) for `'one_epoch'` (FedAvg).
    model_aggregator: A `tff.aggregators` factory; defaults to
      `tff.aggregators.MeanFactory()` (example-weighted mean).
    clip_value: Elementwise clamp of the gradient estimate, or None.
    ema_decay: If set, `get_model_weights` returns an EMA of the weights.
    client_learning_rate: Local step size of `'one_epoch'`.
    parallel_perturbations: Loop iterations over k allowed to overlap.
    seed: Base seed of the directions.

  Returns:
    A `LearningProcess`; `get_model_weights` gives the weights to evaluate.

  Raises:
    ValueError: For bad hyperparameters, naming the argument.
  """
  validate_hparams(num_perturbations, sigma, estimator, mode, clip_value,
                   ema_decay, client_learning_rate, parallel_perturbations)
  if server_optimizer is None:
    server_optimizer = (tff.learning.optimizers.build_adam(1e-2)
                        if mode == 'fedsgd'
                        else tff.learning.optimizers.build_sgdm(1.0))
  if model_aggregator is None:
    model_aggregator = tff.aggregators.MeanFactory()

  client_work = build_client_work(model, num_perturbations, sigma, estimator,
                                  mode, client_learning_rate, clip_value,
                                  parallel_perturbations)
  weights_type = _model_weights_type(model)
  trainable_type = weights_type.trainable
  shapes = [t.shape for t in trainable_type]
  update_type = client_work.type_signature.result['update']
  weighted = isinstance(model_aggregator,
                        tff.aggregators.WeightedAggregationFactory)
  if weighted:
    aggregator = model_aggregator.create(update_type,
                                         tff.TensorType(np.float32))
  else:
    aggregator = model_aggregator.create(update_type)

  @tff.tensorflow.computation
  def initial_server_state():
    trainable = tuple(tf.constant(w) for w in model.initial_weights[0])
    return collections.OrderedDict(
        model_weights=tff.learning.models.ModelWeights(
            trainable=trainable,
            non_trainable=tuple(
                tf.constant(w) for w in model.initial_weights[1])),
        round_num=tf.constant(0, tf.int64),
        optimizer=server_optimizer.initialize(
            tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype),
                                  trainable)),
        ema_weights=trainable if ema_decay is not None else ())

  server_type = initial_server_state.type_signature.result

  @tff.federated_computation
  def initialize_fn():
    s = tff.federated_eval(initial_server_state, tff.SERVER)
    return tff.federated_zip(BaffleState(
        global_model_weights=s.model_weights, round_num=s.round_num,
        aggregator=aggregator.initialize(), optimizer=s.optimizer,
        ema_weights=s.ema_weights))

  @tff.tensorflow.computation(tff.TensorType(np.int64))
  def make_round_seed(round_num):
    return round_seed(seed, round_num)

  @tff.tensorflow.computation(server_type, update_type,
                              tff.TensorType(np.int64, [2]))
  def server_update(server, update, this_round_seed):
    weights = server['model_weights']
    if mode == 'fedsgd':
      grads = rebuild_gradient(shapes, this_round_seed, update)
      if clip_value is not None:
        grads = [tf.clip_by_value(g, -clip_value, clip_value) for g in grads]
    else:
      grads = list(update)
    optimizer_state, trainable = server_optimizer.next(
        server['optimizer'], tuple(weights.trainable), tuple(grads))
    if ema_decay is not None:
      ema = tuple(ema_decay * e + (1.0 - ema_decay) * w
                  for e, w in zip(server['ema_weights'], trainable))
    else:
      ema = ()
    new_server = collections.OrderedDict(
        model_weights=tff.learning.models.ModelWeights(
            trainable=tuple(trainable), non_trainable=weights.non_trainable),
        round_num=server['round_num'] + 1,
        optimizer=optimizer_state,
        ema_weights=ema)
    metrics = collections.OrderedDict(
        gradient_norm=tf.linalg.global_norm(grads))
    return new_server, metrics

  state_type = initialize_fn.type_signature.result
  data_type = tff.FederatedType(client_work.type_signature.parameter[2],
                                tff.CLIENTS)

  @tff.federated_computation(state_type, data_type)
  def next_fn(state, data):
    this_round_seed = tff.federated_map(make_round_seed, state.round_num)
    client_weights = tff.federated_broadcast(state.global_model_weights)
    client_seed = tff.federated_broadcast(this_round_seed)
    outputs = tff.federated_map(client_work,
                                (client_weights, client_seed, data))
    if weighted:
      agg = aggregator.next(state.aggregator, outputs.update, outputs.weight)
    else:
      agg = aggregator.next(state.aggregator, outputs.update)
    server = tff.federated_zip(collections.OrderedDict(
        model_weights=state.global_model_weights, round_num=state.round_num,
        optimizer=state.optimizer, ema_weights=state.ema_weights))
    new_server, server_metrics = tff.federated_map(
        server_update, (server, agg.result, this_round_seed))
    new_state = tff.federated_zip(BaffleState(
        global_model_weights=new_server.model_weights,
        round_num=new_server.round_num, aggregator=agg.state,
        optimizer=new_server.optimizer, ema_weights=new_server.ema_weights))
    metrics = tff.federated_zip(collections.OrderedDict(
        client_work=tff.federated_zip(collections.OrderedDict(
            train=tff.federated_zip(collections.OrderedDict(
                loss=tff.federated_mean(outputs.loss, outputs.weight),
                num_examples=tff.federated_sum(outputs.weight))))),
        aggregator=agg.measurements,
        finalizer=server_metrics))
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)

  @tff.tensorflow.computation(state_type.member)
  def get_model_weights(state):
    if ema_decay is None:
      return state.global_model_weights
    return tff.learning.models.ModelWeights(
        trainable=state.ema_weights,
        non_trainable=state.global_model_weights.non_trainable)

  @tff.tensorflow.computation(state_type.member,
                              state_type.member.global_model_weights)
  def set_model_weights(state, model_weights):
    ema = model_weights.trainable if ema_decay is not None else ()
    return BaffleState(global_model_weights=model_weights,
                       round_num=state.round_num, aggregator=state.aggregator,
                       optimizer=state.optimizer, ema_weights=ema)

  return tff.learning.templates.LearningProcess(
      initialize_fn, next_fn, get_model_weights, set_model_weights)
