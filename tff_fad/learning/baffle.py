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
paper's `(1/K) sum_k [dL_k / sigma] (delta_k / sigma)`), optionally clamps it
elementwise (`clip_value`), and applies a server optimizer
(Adam 1e-2 by default, as in the official code), optionally keeping an EMA of
the weights for evaluation.

The official code's recipe (github FengHZ/BAFFLE) needs three more options:
`client_clip_inf_norm` (each client rescales its own estimate to an inf-norm <=
c, torch's `clip_grad_norm_(c, norm_type='inf')`, before averaging; the
official code clips so, with c = 0.3, rather than clamping each element: a
scalar per client, so it rescales the K scores and the upload stays K scalars),
`weight_decay` (torch Adam's L2 term, `g + wd * w`) and an EMA updated every
`ema_every` rounds with torch_ema's warm-up (`ema_decay_at`).

Directions (`'fedsgd'`): with `directions='shared'` (the default, the paper's
protocol) every client uses the round's K directions and uploads K scores,
which any aggregator (secure sums, DP) can average: K directions per round.
With `directions='per_client'` (what produced the official code's numbers) each
client draws its own seed (the round seed folded with a fingerprint of its
batch) and uploads it (8 bytes) with its K scores; the server rebuilds each
client's estimate inside a `tff.federated_aggregate` whose accumulate
regenerates that client's directions, so the upload stays K scalars + a seed
and no client sends a model-sized vector: C x K directions per round (an
estimate about sqrt(C) closer to the gradient), but the server sees each
client's scores, so secure aggregation does not apply (refused).

`mode='one_epoch'` is the paper's second mode (FedAvg-like): each client takes
one forward-only step of its optimizer per local batch with the same
estimator, and uploads its model delta; the server applies its optimizer to
the mean delta.

The model is a `tff.learning.models.FunctionalModel` read as TFF reads it
(`functional_models`): batches as `{'x', 'y'}` or `(x, y)`, its own loss, its
own metrics (updated with the loss pass at the unperturbed weights, which the
forward estimator needs anyway; the central and jvp estimators pay one extra
forward pass per step for it).

Client memory stays close to inference with `parallel_perturbations=1`
(the default): the K perturbed models are never held at once; a
`tf.while_loop` regenerates z_k from `(seed, k)` at each iteration. With
`parallel_perturbations=P > 1` the `forward` and `central` estimators
evaluate P perturbed models per batched forward pass (the P weight sets
stacked, `functional_models.stacked_predictions`: tff_fad's models run them
as one grouped convolution per layer): fewer, larger passes for more memory,
faster only where one pass leaves the hardware idle (on a 2-core CPU it is
not: README, BAFFLE); `jvp` then lets P loop iterations overlap. Server and
client share `perturbation` so they agree bit for bit.
"""

import collections
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad import aggregation
from tff_fad import core as fad
from tff_fad.core import local_ad
from tff_fad.learning import functional_models as fm

ESTIMATORS = ('forward', 'central', 'jvp')
MODES = ('fedsgd', 'one_epoch')
DIRECTIONS = ('shared', 'per_client')

AggregationFactory = Union[tff.aggregators.UnweightedAggregationFactory,
                           tff.aggregators.WeightedAggregationFactory]
Tensors = Sequence[tf.Tensor]
LossFn = Callable[[Tensors], tf.Tensor]


_STATE = tff.learning.templates.LearningAlgorithmState


def validate_hparams(num_perturbations: int, sigma: float, estimator: str,
                     mode: str = 'fedsgd', clip_value: Optional[float] = None,
                     ema_decay: Optional[float] = None,
                     parallel_perturbations: int = 1,
                     client_clip_inf_norm: Optional[float] = None,
                     weight_decay: float = 0.0, ema_every: int = 1) -> None:
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
  if parallel_perturbations < 1:
    raise ValueError('parallel_perturbations must be >= 1, got '
                     f'{parallel_perturbations!r}.')
  if client_clip_inf_norm is not None and not client_clip_inf_norm > 0:
    raise ValueError('client_clip_inf_norm must be > 0 or None, got '
                     f'{client_clip_inf_norm!r}.')
  if not weight_decay >= 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay!r}.')
  if ema_every < 1:
    raise ValueError(f'ema_every must be >= 1, got {ema_every!r}.')


def ema_decay_at(decay: float, num_updates, warmup: bool):
  """The decay of the `num_updates`-th EMA update (1-based).

  With `warmup`, torch_ema's `ExponentialMovingAverage(use_num_updates=True)`
  (the official BAFFLE code's EMA): `min(decay, (1 + n) / (10 + n))`, so the
  first updates follow the weights closely (2/11, 3/12, ...) and the decay
  reaches `decay` after `(10 decay - 1) / (1 - decay)` updates (1,789 for
  0.995). Without, `decay` throughout.
  """
  if not warmup:
    return tf.constant(decay, tf.float32)
  n = tf.cast(num_updates, tf.float32)
  return tf.minimum(tf.constant(decay, tf.float32), (1.0 + n) / (10.0 + n))


def inf_norm_scale(tensors: Tensors, max_norm: float) -> tf.Tensor:
  """`min(1, max_norm / (max |t| + 1e-6))`, torch's inf-norm gradient clip.

  `torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type='inf')`
  multiplies every gradient by this: the direction is kept.
  """
  inf_norm = tf.reduce_max([tf.reduce_max(tf.abs(t)) for t in tensors])
  return tf.minimum(1.0, max_norm / (inf_norm + 1e-6))


def forward_passes_per_step(estimator: str, num_perturbations: int) -> int:
  """Passes through the network a client makes per BAFFLE step.

  A step (a FedSGD round, or one local step of `'one_epoch'`) makes the
  unperturbed pass, whose outputs update the metrics (and are the forward
  estimator's base loss), then per direction: `'forward'` one perturbed pass,
  `'central'` two, `'jvp'` one forward-mode pass, counted as two: it carries
  a primal and a tangent through every layer, twice a forward pass's
  arithmetic. So `K + 1`, `2K + 1` and `2K + 1`. (Measured on LeNet, a jvp
  direction took 1.4x the time of a central one: TF 2.14 runs some forward
  rules as transposed backward ops; README, "BAFFLE on a forward-pass
  budget".)

  Args:
    estimator: One of `ESTIMATORS`.
    num_perturbations: K.
  """
  per_direction = {'forward': 1, 'central': 2, 'jvp': 2}
  if estimator not in per_direction:
    raise ValueError(f'estimator must be one of {ESTIMATORS}, got '
                     f'{estimator!r}.')
  return 1 + per_direction[estimator] * num_perturbations


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
  # The core's seeded directions (those of jvp(..., tangent_seed=True)).
  specs = [tf.TensorSpec(s, tf.float32) for s in shapes]
  return fad.seeded_direction(seed, k, [specs])[0]


def stacked_perturbations(shapes: Sequence[Sequence[int]], seed: tf.Tensor,
                          first_k: tf.Tensor, count: int) -> list[tf.Tensor]:
  """Directions z_first_k ... z_(first_k + count - 1), stacked: `[count, *s]`.

  The same values as `count` calls of `perturbation`.
  """
  per_direction = [perturbation(shapes, seed, first_k + i)
                   for i in range(count)]
  return [tf.stack(leaves) for leaves in zip(*per_direction)]


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
  return local_ad.jvp(loss_fn, [watched], [list(tangents)])


def estimate_scores(loss_fn: LossFn, weights: Tensors, seed: tf.Tensor,
                    num_perturbations: int, sigma: float, estimator: str,
                    parallel_perturbations: int = 1,
                    base_loss: Optional[tf.Tensor] = None,
                    stacked_loss_fn: Optional[LossFn] = None
                    ) -> tuple[tf.Tensor, tf.Tensor]:
  """Computes a client's K scalar scores d_k with forward passes only.

  Args:
    loss_fn: Maps trainable weights to the scalar minibatch loss.
    weights: The broadcast trainable weights `w`.
    seed: int64 `[2]` round seed.
    num_perturbations: K.
    sigma: Perturbation scale (unused by `'jvp'`).
    estimator: `'forward'`, `'central'` or `'jvp'`.
    parallel_perturbations: P. With 1, one perturbed model at a time (memory
      near inference). With P > 1, `'forward'` and `'central'` evaluate P
      perturbed models (2P for `'central'`) per call of `stacked_loss_fn`;
      `'jvp'` lets P loop iterations overlap.
    base_loss: `loss_fn(weights)` if the caller already has it (the forward
      estimator then makes K forward passes, not K + 1).
    stacked_loss_fn: Maps stacked trainable weights (`[P, *shape]` each) to
      the `[P]` losses; default `tf.vectorized_map` over `loss_fn`.

  Returns:
    `(scores, loss)`: float32 `[K]` and the loss at `w` (for `'central'`, the
    mean of the two perturbed losses, equal to it up to O(sigma^2)).
  """
  shapes = [w.shape for w in weights]
  if estimator == 'forward' and base_loss is None:
    base_loss = loss_fn(weights)
  elif estimator != 'forward':
    base_loss = None
  if parallel_perturbations > 1 and estimator != 'jvp':
    if stacked_loss_fn is None:
      stacked_loss_fn = lambda stacked: tf.vectorized_map(loss_fn, stacked)
    return _stacked_scores(stacked_loss_fn, weights, seed, num_perturbations,
                           sigma, estimator, parallel_perturbations,
                           base_loss)

  def score(k):
    z = perturbation(shapes, seed, k)
    if estimator == 'jvp':
      loss, jvp = directional_derivative(loss_fn, weights, z)
      return jvp, loss
    plus = loss_fn([w + sigma * t for w, t in zip(weights, z)])
    if estimator == 'forward':
      return (plus - base_loss) / sigma, base_loss
    # One perturbed model at a time (side by side, the two passes would hold
    # two sets of activations).
    with tf.control_dependencies([plus]):
      minus = loss_fn([w - sigma * t for w, t in zip(weights, z)])
    return (plus - minus) / (2.0 * sigma), (plus + minus) / 2.0

  def body(k, scores, loss_sum):
    d, loss = score(k)
    return k + 1, scores.write(k, d), loss_sum + loss

  # The loop starts once the unperturbed pass is done: run side by side, the
  # two passes would hold two sets of activations.
  with tf.control_dependencies([] if base_loss is None else [base_loss]):
    _, scores, loss_sum = tf.while_loop(
        lambda k, *_: k < num_perturbations, body,
        (tf.constant(0), tf.TensorArray(tf.float32, size=num_perturbations),
         tf.constant(0.0)),
        parallel_iterations=parallel_perturbations)
  loss = base_loss if base_loss is not None else loss_sum / num_perturbations
  return scores.stack(), loss


def _stacked_scores(stacked_loss_fn: LossFn, weights: Tensors,
                    seed: tf.Tensor, num_perturbations: int, sigma: float,
                    estimator: str, parallel_perturbations: int,
                    base_loss: Optional[tf.Tensor]
                    ) -> tuple[tf.Tensor, tf.Tensor]:
  """`estimate_scores` for `'forward'`/`'central'`, P directions per pass.

  A `tf.while_loop` over the K // P full chunks (one at a time), then one
  smaller chunk for the K % P left.
  """
  shapes = [w.shape for w in weights]
  chunk = min(parallel_perturbations, num_perturbations)
  num_chunks, rest = divmod(num_perturbations, chunk)

  def chunk_scores(first_k, count):
    z = stacked_perturbations(shapes, seed, first_k, count)
    if estimator == 'forward':
      plus = stacked_loss_fn([w + sigma * t for w, t in zip(weights, z)])
      return (plus - base_loss) / sigma, tf.zeros([])
    # One pass over the 2P models w + sigma z and w - sigma z.
    losses = stacked_loss_fn([
        tf.concat([w + sigma * t, w - sigma * t], axis=0)
        for w, t in zip(weights, z)])
    plus, minus = losses[:count], losses[count:]
    return (plus - minus) / (2.0 * sigma), tf.reduce_sum(plus + minus) / 2.0

  def body(c, scores, loss_sum):
    d, loss = chunk_scores(c * chunk, chunk)
    return c + 1, scores.write(c, d), loss_sum + loss

  with tf.control_dependencies([] if base_loss is None else [base_loss]):
    _, scores, loss_sum = tf.while_loop(
        lambda c, *_: c < num_chunks, body,
        (tf.constant(0),
         tf.TensorArray(tf.float32, size=num_chunks,
                        element_shape=tf.TensorShape([chunk])),
         tf.constant(0.0)),
        parallel_iterations=1)
  scores = scores.concat()
  if rest:
    d, loss = chunk_scores(tf.constant(num_chunks * chunk), rest)
    scores, loss_sum = tf.concat([scores, d], axis=0), loss_sum + loss
  loss = base_loss if base_loss is not None else loss_sum / num_perturbations
  # The static shape [K] (TFF's sums need it; `concat` does not keep it).
  return tf.reshape(scores, [num_perturbations]), loss


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


def estimate_cosine_to_gradient(
    model: tff.learning.models.FunctionalModel,
    model_weights: Any,
    batches: Sequence[Any],
    *,
    num_perturbations: int,
    sigma: float = 1e-4,
    estimator: str = 'forward',
    directions: str = 'shared',
    seed: int = 0,
) -> collections.OrderedDict:
  """How close one round's gradient estimate is to the true gradient.

  A diagnostic (it backpropagates, which BAFFLE's clients never do): each
  batch stands for one client's round, as in `'fedsgd'`. The estimate is the
  mean over the batches of each batch's estimate, from K scores of
  `estimate_scores` along directions of one seed (`'shared'`) or of a seed
  per batch (`'per_client'`), rebuilt with `rebuild_gradient` (before any
  clipping); the gradient is the mean of the batches' backprop gradients;
  both weighted by batch size, as the process weights clients by examples.

  An estimate of g from K standard normal directions has mean g and
  E|estimate - g|^2 = |g|^2 (n + 1) / K for n parameters, so its cosine to g
  is about sqrt(K / (K + n + 1)), sqrt(K / n) when K << n.
  `expected_cosine` is that figure for K directions (shared) or C K
  (per-client: C clients' independent directions around one gradient),
  capped at 1. `predicted_cosine` also counts how the clients' gradients
  g_i differ: with weights p_i and mean gradient g,
  |g| / sqrt(|g|^2 + (n + 1) / K * sum_i p_i^2 |g_i|^2) for per-client
  directions (each client's noise scales with its own |g_i|), and
  sqrt(K / (K + n + 1)) for shared ones (one set of directions applied to
  the mean).

  Args:
    model: The `FunctionalModel`.
    model_weights: `ModelWeights` (or `(trainable, non_trainable)`) at which
      to compare.
    batches: The clients' batches (`{'x', 'y'}` or `(x, y)`).
    num_perturbations: K.
    sigma: Perturbation scale of the `'forward'`/`'central'` estimators.
    estimator: `'forward'`, `'central'` or `'jvp'`.
    directions: `'shared'` or `'per_client'`.
    seed: Seed of the directions.

  Returns:
    `OrderedDict(cosine, expected_cosine, predicted_cosine, estimate_norm,
    gradient_norm)` of Python floats.
  """
  if directions not in DIRECTIONS:
    raise ValueError(f'directions must be one of {DIRECTIONS}, got '
                     f'{directions!r}.')
  if not batches:
    raise ValueError('estimate_cosine_to_gradient needs at least one batch.')
  validate_hparams(num_perturbations, sigma, estimator)
  trainable, non_trainable = (
      (model_weights.trainable, model_weights.non_trainable)
      if isinstance(model_weights, tff.learning.models.ModelWeights)
      else model_weights)
  trainable = [tf.constant(t, tf.float32) for t in trainable]
  non_trainable = [tf.constant(t) for t in non_trainable]
  shapes = [t.shape for t in trainable]

  @tf.function
  def one_client(batch, client_seed):
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      loss, _, count = fm.batch_loss(model, (trainable, non_trainable), batch,
                                     training=True)
    gradient = tape.gradient(loss, trainable)
    scores, _ = estimate_scores(batch_loss_fn(model, non_trainable, batch),
                                trainable, client_seed, num_perturbations,
                                sigma, estimator)
    estimate = rebuild_gradient(shapes, client_seed, scores)
    return gradient, estimate, tf.cast(count, tf.float32)

  gradient_sum = [tf.zeros(s) for s in shapes]
  estimate_sum = [tf.zeros(s) for s in shapes]
  counts, squared_norms = [], []
  for i, batch in enumerate(batches):
    client_seed = tf.constant(
        [seed, i if directions == 'per_client' else 0], tf.int64)
    gradient, estimate, count = one_client(batch, client_seed)
    gradient_sum = [a + count * g for a, g in zip(gradient_sum, gradient)]
    estimate_sum = [a + count * e for a, e in zip(estimate_sum, estimate)]
    counts.append(float(count))
    squared_norms.append(float(tf.linalg.global_norm(gradient))**2)
  total = sum(counts)
  flat_gradient = tf.concat([tf.reshape(g, [-1]) for g in gradient_sum], 0)
  flat_estimate = tf.concat([tf.reshape(e, [-1]) for e in estimate_sum], 0)
  cosine = tf.reduce_sum(flat_gradient * flat_estimate) / (
      tf.norm(flat_gradient) * tf.norm(flat_estimate))
  num_params = int(flat_gradient.shape[0])
  independent = num_perturbations * (
      len(batches) if directions == 'per_client' else 1)
  noise_per_unit = (num_params + 1) / num_perturbations
  mean_squared_norm = float(tf.norm(flat_gradient))**2 / total**2
  if directions == 'per_client':
    noise = noise_per_unit * sum(
        (c / total)**2 * q for c, q in zip(counts, squared_norms))
  else:
    noise = noise_per_unit * mean_squared_norm
  return collections.OrderedDict(
      cosine=float(cosine),
      expected_cosine=float(np.sqrt(min(1.0, independent / num_params))),
      predicted_cosine=float(np.sqrt(
          mean_squared_norm / (mean_squared_norm + noise))),
      estimate_norm=float(tf.norm(flat_estimate)) / total,
      gradient_norm=float(tf.norm(flat_gradient)) / total)


def round_seed(seed: int, round_num: tf.Tensor) -> tf.Tensor:
  """The int64 `[2]` seed of a round."""
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(round_num, tf.int64)])


def batch_loss_fn(model: tff.learning.models.FunctionalModel,
                  non_trainable: Tensors, batch: Any) -> LossFn:
  """Trainable weights -> the model's loss on `batch` (training mode)."""
  x, y = fm.batch_inputs(batch)

  def loss_fn(trainable):
    output = model.predict_on_batch((tuple(trainable), tuple(non_trainable)), x,
                                    True)
    return model.loss(output, y)

  return loss_fn


def stacked_batch_loss_fn(model: tff.learning.models.FunctionalModel,
                          non_trainable: Tensors, batch: Any) -> LossFn:
  """Stacked trainable weights (`[P, *shape]` each) -> `[P]` losses on `batch`.

  One batched pass (`functional_models.stacked_predictions`), training mode.
  """
  x, y = fm.batch_inputs(batch)

  def loss_fn(stacked_trainable):
    outputs = fm.stacked_predictions(
        model, (tuple(stacked_trainable), tuple(non_trainable)), x, True)
    return tf.vectorized_map(lambda output: model.loss(output, y), outputs)

  return loss_fn


def _loss_and_metrics(model, weights, batch, metrics_state):
  """The loss at `weights` and the metrics updated with the same pass."""
  loss, output, n = fm.batch_loss(model, weights, batch, training=True)
  return loss, fm.update_metrics(model, metrics_state, batch, output,
                                 loss), tf.cast(n, tf.float32)


def _data_fingerprint(batch: Any) -> tf.Tensor:
  """An int32 of a batch's inputs (the bits of their float32 sum).

  Different clients must explore different directions; the data differ, so
  a fingerprint of a batch decorrelates them reproducibly.
  """
  x, _ = fm.batch_inputs(batch)
  return tf.bitcast(tf.reduce_sum(tf.cast(tf.nest.flatten(x)[0], tf.float32)),
                    tf.int32)


def build_client_work(
    model: tff.learning.models.FunctionalModel,
    num_perturbations: int = 500,
    sigma: float = 1e-4,
    estimator: str = 'forward',
    mode: str = 'fedsgd',
    client_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    clip_value: Optional[float] = 0.3,
    parallel_perturbations: int = 1,
    client_weighting: tff.learning.ClientWeighting = (
        tff.learning.ClientWeighting.NUM_EXAMPLES),
    client_clip_inf_norm: Optional[float] = None,
    weight_decay: float = 0.0,
    directions: str = 'shared',
) -> tff.Computation:
  """Builds the client's `tff.tensorflow.computation` (forward passes only).

  Its argument is `(model_weights, seed, dataset)`: the broadcast
  `ModelWeights`, the int64 `[2]` round seed and the client's batched dataset.
  It returns `OrderedDict(update, weight, metrics)`: what is uploaded, the
  aggregation weight (0 if the update is not finite) and the model's
  unfinalized metrics, updated with the loss pass at each step's weights.

  * `'fedsgd'`: on the client's first batch, `update` is the float32 `[K]`
    scores; with `client_clip_inf_norm=c` they are multiplied by
    `inf_norm_scale` of the client's own estimate (rebuilt from the seed:
    K direction draws, no forward pass), so that estimate's inf-norm is
    <= c. With `directions='per_client'`, `update` is
    `OrderedDict(scores=[K], seed=int64[2])`: the client's own seed.
  * `'one_epoch'`: one `client_optimizer` step per batch along the clipped
    estimate (`clip_value` elementwise, then `client_clip_inf_norm`), plus
    `weight_decay * w`, with directions seeded by `(round seed, step, a
    fingerprint of the client's data)` so clients do not share directions;
    `update = w_start - w_end` (per trainable tensor). The optimizer starts
    fresh each round (TFF clients are stateless).

  Args: see `build_baffle`; `client_optimizer` defaults to SGD, rate 0.1.

  Returns:
    The client computation.
  """
  validate_hparams(num_perturbations, sigma, estimator, mode, clip_value,
                   None, parallel_perturbations, client_clip_inf_norm,
                   weight_decay)
  if client_optimizer is None:
    client_optimizer = tff.learning.optimizers.build_sgdm(0.1)
  weights_type = fm.weights_type(model)
  data_type = fm.data_type(model)
  seed_type = tff.TensorType(np.int64, [2])

  def client_result(update, count, metrics):
    update, non_finite = fm.zero_if_non_finite(update)
    return collections.OrderedDict(
        update=update,
        weight=fm.client_weight(client_weighting, non_finite, count),
        metrics=tf.cond(non_finite > 0, model.initialize_metrics_state,
                        lambda: metrics))

  if mode == 'fedsgd':

    @tff.tensorflow.computation(weights_type, seed_type, data_type)
    def client_fedsgd(model_weights, seed, dataset):
      batch = dataset.take(1).get_single_element()
      if directions == 'per_client':
        seed = tf.random.experimental.stateless_fold_in(
            seed, _data_fingerprint(batch))
      non_trainable = tuple(model_weights.non_trainable)
      loss, metrics, n = _loss_and_metrics(
          model, (tuple(model_weights.trainable), non_trainable), batch,
          model.initialize_metrics_state())
      scores, _ = estimate_scores(
          batch_loss_fn(model, non_trainable, batch),
          list(model_weights.trainable), seed, num_perturbations, sigma,
          estimator, parallel_perturbations, base_loss=loss,
          stacked_loss_fn=stacked_batch_loss_fn(model, non_trainable, batch))
      if client_clip_inf_norm is not None:
        shapes = [w.shape for w in model_weights.trainable]
        scores = scores * inf_norm_scale(
            rebuild_gradient(shapes, seed, scores), client_clip_inf_norm)
      result = client_result(scores, n, metrics)
      if directions == 'per_client':
        result['update'] = collections.OrderedDict(scores=result['update'],
                                                   seed=seed)
      return result

    return client_fedsgd

  @tff.tensorflow.computation(weights_type, seed_type, data_type)
  def client_one_epoch(model_weights, seed, dataset):
    # A tuple, not a list: tf.data would pack a list into one tensor.
    start = tuple(tf.identity(w) for w in model_weights.trainable)
    non_trainable = tuple(model_weights.non_trainable)
    shapes = [w.shape for w in start]
    client_seed = tf.random.experimental.stateless_fold_in(
        seed, _data_fingerprint(dataset.take(1).get_single_element()))

    def step(carry, batch):
      weights, optimizer_state, step_num, metrics, num_examples = carry
      loss, metrics, n = _loss_and_metrics(
          model, (weights, non_trainable), batch, metrics)
      step_seed = tf.random.experimental.stateless_fold_in(
          client_seed, step_num)
      scores, _ = estimate_scores(
          batch_loss_fn(model, non_trainable, batch), list(weights),
          step_seed, num_perturbations, sigma, estimator,
          parallel_perturbations, base_loss=loss,
          stacked_loss_fn=stacked_batch_loss_fn(model, non_trainable, batch))
      grads = rebuild_gradient(shapes, step_seed, scores)
      if clip_value is not None:
        grads = [tf.clip_by_value(g, -clip_value, clip_value) for g in grads]
      if client_clip_inf_norm is not None:
        scale = inf_norm_scale(grads, client_clip_inf_norm)
        grads = [scale * g for g in grads]
      if weight_decay:
        grads = [g + weight_decay * w for g, w in zip(grads, weights)]
      optimizer_state, weights = client_optimizer.next(
          optimizer_state, weights, tuple(grads))
      return (weights, optimizer_state, step_num + 1, metrics,
              num_examples + n)

    specs = tuple(tf.TensorSpec(w.shape, w.dtype) for w in start)
    final, _, _, metrics, num_examples = dataset.reduce(
        (start, client_optimizer.initialize(specs), tf.constant(0),
         model.initialize_metrics_state(), tf.constant(0.0)), step)
    return client_result(tuple(s - f for s, f in zip(start, final)),
                         num_examples, metrics)

  return client_one_epoch


class _PerClientDirectionsMean:
  """The weighted mean of the clients' estimates, each rebuilt from its seed.

  The aggregation of `directions='per_client'`: a `tff.federated_aggregate`
  whose accumulate regenerates one client's K directions from the seed it
  uploaded and adds `weight * (1/K) sum_k scores[k] z_k`; report divides by
  the total weight. Same `initialize`/`next` shape as a TFF aggregation
  process (empty state and measurements).
  """

  def __init__(self, shapes, update_type):
    self._shapes = shapes
    acc_type = tff.StructType([
        ('sum', tff.StructWithPythonType(
            [tff.TensorType(np.float32, s) for s in shapes], tuple)),
        ('weight', tff.TensorType(np.float32))])
    value_type = tff.StructType([('update', update_type),
                                 ('weight', tff.TensorType(np.float32))])

    @tff.tensorflow.computation
    def zero():
      return collections.OrderedDict(
          sum=tuple(tf.zeros(s) for s in shapes), weight=tf.constant(0.0))

    @tff.tensorflow.computation(acc_type, value_type)
    def accumulate(acc, value):
      estimate = rebuild_gradient(shapes, value.update.seed,
                                  value.update.scores)
      return collections.OrderedDict(
          sum=tuple(a + value.weight * g
                    for a, g in zip(acc.sum, estimate)),
          weight=acc.weight + value.weight)

    @tff.tensorflow.computation(acc_type, acc_type)
    def merge(a, b):
      return collections.OrderedDict(
          sum=tuple(x + y for x, y in zip(a.sum, b.sum)),
          weight=a.weight + b.weight)

    @tff.tensorflow.computation(acc_type)
    def report(acc):
      return tuple(tf.math.divide_no_nan(t, acc.weight) for t in acc.sum)

    self._zero, self._accumulate = zero, accumulate
    self._merge, self._report = merge, report
    self.result_type = report.type_signature.result

  def initialize(self):
    return tff.federated_value((), tff.SERVER)

  def next(self, state, value, weight):
    result = tff.federated_aggregate(
        tff.federated_zip(collections.OrderedDict(update=value,
                                                  weight=weight)),
        self._zero(), self._accumulate, self._merge, self._report)
    return tff.templates.MeasuredProcessOutput(
        state=state, result=result,
        measurements=tff.federated_value((), tff.SERVER))


def build_baffle(
    model_fn: fm.ModelArg,
    client_optimizer_fn: Optional[fm.OptimizerArg] = None,
    server_optimizer_fn: Optional[fm.OptimizerArg] = None,
    *,
    client_weighting: tff.learning.ClientWeighting = (
        tff.learning.ClientWeighting.NUM_EXAMPLES),
    model_aggregator: Optional[AggregationFactory] = None,
    metrics_aggregator: Optional[fm.MetricsAggregator] = None,
    num_perturbations: int = 500,
    sigma: float = 1e-4,
    estimator: str = 'forward',
    mode: str = 'fedsgd',
    clip_value: Optional[float] = 0.3,
    ema_decay: Optional[float] = None,
    parallel_perturbations: int = 1,
    seed: int = 0,
    client_clip_inf_norm: Optional[float] = None,
    weight_decay: float = 0.0,
    ema_every: int = 1,
    ema_warmup: bool = False,
    directions: str = 'shared',
) -> tff.learning.templates.LearningProcess:
  """Builds BAFFLE as a `tff.learning.templates.LearningProcess`.

  Takes what `tff.learning.algorithms.build_weighted_fed_avg` takes, plus
  BAFFLE's own settings. `next(state, client_data)` has type
  `(state@SERVER, {Sequence[batch]}@CLIENTS) -> <state@SERVER,
  metrics@SERVER>`. One round:

  1. `round_seed = (seed, round_num)@SERVER`; broadcast
     `<model_weights, round_seed>@SERVER -> @CLIENTS`.
  2. Clients run `build_client_work(...)`; `{update}@CLIENTS` is the only
     uploaded payload besides the aggregation weight and the metrics:
     K float32 scores (`'fedsgd'`) or a model delta (`'one_epoch'`).
  3. `model_aggregator` reduces `{update}@CLIENTS -> update@SERVER`
     (weighted by `client_weighting` if the factory is weighted).
  4. The server rebuilds g from the seed (`'fedsgd'`) or takes the mean delta
     (`'one_epoch'`), clips g (fedsgd only; one_epoch clips on clients), adds
     `weight_decay * w` (fedsgd; one_epoch's clients add it) and applies the
     server optimizer (skipped, as in TFF, if g is not finite); EMA of the
     weights if `ema_decay` is set, every `ema_every` rounds.

  Why not `compose_learning_process`: there the finalizer cannot see what the
  distributor broadcast, so the server would need a second round counter kept
  in lock step with the distributor's to regenerate the directions. A single
  state with one round counter (in the finalizer's state) keeps the shared
  seed in one place.

  Args:
    model_fn: A `tff.learning.models.FunctionalModel` or a no-argument
      function returning one; its trainable weights are perturbed.
    client_optimizer_fn: The local optimizer of `'one_epoch'`; default SGD,
      rate 0.1. Refused with `'fedsgd'`, whose clients take no step.
    server_optimizer_fn: Defaults to Adam(1e-2) for `'fedsgd'` (the official
      code's MNIST setting) and SGD(1.0) for `'one_epoch'` (FedAvg).
    client_weighting: `tff.learning.ClientWeighting` for weighted
      aggregators.
    model_aggregator: A `tff.aggregators` factory; defaults to
      `tff.aggregators.MeanFactory()` (weighted mean).
    metrics_aggregator: Aggregates the model's metrics; default
      `tff.learning.metrics.sum_then_finalize`.
    num_perturbations: K, the number of directions (and uploaded scalars).
    sigma: Perturbation scale of the finite differences.
    estimator: `'forward'`, `'central'` or `'jvp'` (forward-mode AD).
    mode: `'fedsgd'` (upload K scores) or `'one_epoch'` (upload deltas).
    clip_value: Elementwise clamp of the (averaged) gradient estimate, or
      None.
    ema_decay: If set, `get_model_weights` returns an EMA of the weights.
    parallel_perturbations: P, perturbed models per batched forward pass
      (`'forward'`, `'central'`; loop iterations allowed to overlap for
      `'jvp'`); 1, the default, keeps one perturbed model in memory.
    seed: Base seed of the directions.
    client_clip_inf_norm: If set, each client scales its own estimate to an
      inf-norm <= this before averaging (the official code's
      `clip_grad_norm_(0.3, norm_type='inf')`); the upload stays K scores.
    weight_decay: L2 coefficient added to the gradient estimate
      (`g + wd * w`, as torch's `Adam(weight_decay=...)`).
    ema_every: Rounds between EMA updates (e.g. the rounds of an epoch:
      the official code updates its EMA once per epoch).
    ema_warmup: torch_ema's warm-up: the n-th EMA update uses
      `ema_decay_at(ema_decay, n, True) = min(ema_decay, (1+n)/(10+n))`.
    directions: `'shared'` (one seed per round, K scores per client,
      compatible with secure sums and DP) or `'per_client'` (`'fedsgd'`
      only: each client's own seed, uploaded with its K scores; the server
      rebuilds and averages the clients' estimates in a
      `tff.federated_aggregate`, weighted by `client_weighting`; no
      `model_aggregator`).

  Returns:
    A `LearningProcess` with a `LearningAlgorithmState` (the server
    optimizer's state, the EMA and the round counter are the finalizer's)
    and TFF's metrics layout plus `gradient_estimate/norm` (of the clipped
    estimate the server applies); `get_model_weights` gives the weights to
    evaluate; `get_hparams(state)['finalizer']` are the server optimizer's
    hyperparameters.

  Raises:
    ValueError, TypeError: For bad arguments, naming them.
  """
  validate_hparams(num_perturbations, sigma, estimator, mode, clip_value,
                   ema_decay, parallel_perturbations, client_clip_inf_norm,
                   weight_decay, ema_every)
  if directions not in DIRECTIONS:
    raise ValueError(f'directions must be one of {DIRECTIONS}, got '
                     f'{directions!r}.')
  if mode == 'fedsgd' and client_optimizer_fn is not None:
    raise ValueError(
        "client_optimizer_fn applies to mode='one_epoch' only: 'fedsgd' "
        'clients take no local step (they return K perturbed-loss scores, '
        'and server_optimizer_fn applies the estimate). Leave it out, or '
        "use mode='one_epoch'.")
  per_client = directions == 'per_client'
  if per_client and mode != 'fedsgd':
    raise ValueError("directions='per_client' applies to mode='fedsgd' "
                     "('one_epoch' clients already draw their own).")
  if per_client and model_aggregator is not None:
    raise ValueError(
        "directions='per_client' takes no model_aggregator: the server "
        "rebuilds each client's estimate from that client's K scores and "
        'seed, so it must see them one by one; '
        f'{type(model_aggregator).__name__} cannot apply (secure sums need '
        'every client to use the same directions). Use '
        "directions='shared' with it.")
  model = fm.resolve_model(model_fn, 'build_baffle')
  fm.check_client_weighting(client_weighting)
  client_optimizer = fm.resolve_optimizer(
      client_optimizer_fn, 'client_optimizer_fn',
      lambda: tff.learning.optimizers.build_sgdm(0.1))
  server_optimizer = fm.resolve_optimizer(
      server_optimizer_fn, 'server_optimizer_fn',
      lambda: (tff.learning.optimizers.build_adam(1e-2) if mode == 'fedsgd'
               else tff.learning.optimizers.build_sgdm(1.0)))
  if model_aggregator is None:
    model_aggregator = tff.aggregators.MeanFactory()

  client_work = build_client_work(model, num_perturbations, sigma, estimator,
                                  mode, client_optimizer, clip_value,
                                  parallel_perturbations, client_weighting,
                                  client_clip_inf_norm, weight_decay,
                                  directions)
  weights_type = fm.weights_type(model)
  shapes = [t.shape for t in weights_type.trainable]
  update_type = client_work.type_signature.result['update']
  weighted = isinstance(model_aggregator,
                        tff.aggregators.WeightedAggregationFactory)
  if per_client:
    aggregator = _PerClientDirectionsMean(shapes, update_type)
    update_type = aggregator.result_type
  elif weighted:
    aggregator = model_aggregator.create(update_type,
                                         tff.TensorType(np.float32))
  else:
    aggregator = model_aggregator.create(update_type)

  @tff.tensorflow.computation
  def initial_values():
    weights = fm.initial_model_weights(model)
    return weights, collections.OrderedDict(
        optimizer=server_optimizer.initialize(tuple(
            tf.TensorSpec(t.shape, t.dtype) for t in weights.trainable)),
        ema_weights=weights.trainable if ema_decay is not None else (),
        round_num=tf.constant(0, tf.int64))

  @tff.federated_computation
  def initialize_fn():
    values = tff.federated_eval(initial_values, tff.SERVER)
    empty = tff.federated_value((), tff.SERVER)
    return tff.federated_zip(_STATE(
        global_model_weights=values[0], distributor=empty, client_work=empty,
        aggregator=aggregator.initialize(), finalizer=values[1]))

  state_type = initialize_fn.type_signature.result

  @tff.tensorflow.computation(tff.TensorType(np.int64))
  def make_round_seed(round_num):
    return round_seed(seed, round_num)

  @tff.tensorflow.computation(weights_type,
                              state_type.member.finalizer, update_type,
                              tff.TensorType(np.int64, [2]))
  def server_update(weights, finalizer, update, this_round_seed):
    if mode == 'fedsgd':
      grads = (list(update) if per_client
               else rebuild_gradient(shapes, this_round_seed, update))
      if clip_value is not None:
        grads = [tf.clip_by_value(g, -clip_value, clip_value) for g in grads]
      if weight_decay:
        grads = [g + weight_decay * w
                 for g, w in zip(grads, weights.trainable)]
    else:
      grads = list(update)
    grads = tuple(grads)
    _, non_finite = fm.zero_if_non_finite(grads)
    optimizer_state, trainable = tf.cond(
        non_finite > 0,
        lambda: (finalizer['optimizer'], tuple(weights.trainable)),
        lambda: server_optimizer.next(finalizer['optimizer'],
                                      tuple(weights.trainable), grads))
    rounds_done = finalizer['round_num'] + 1
    if ema_decay is not None:
      # The (rounds_done // ema_every)-th update, on rounds ema_every, 2 *
      # ema_every, ...
      decay = ema_decay_at(ema_decay, rounds_done // ema_every, ema_warmup)
      old = tuple(finalizer['ema_weights'])
      ema = tf.cond(
          tf.equal(rounds_done % ema_every, 0),
          lambda: tuple(decay * e + (1.0 - decay) * w
                        for e, w in zip(old, trainable)),
          lambda: old)
    else:
      ema = ()
    new_finalizer = collections.OrderedDict(
        optimizer=optimizer_state, ema_weights=ema, round_num=rounds_done)
    new_weights = tff.learning.models.ModelWeights(
        trainable=tuple(trainable), non_trainable=weights.non_trainable)
    return new_weights, new_finalizer, non_finite, tf.linalg.global_norm(
        grads)

  data_type = tff.FederatedType(fm.data_type(model), tff.CLIENTS)

  @tff.federated_computation(state_type, data_type)
  def next_fn(state, client_data):
    this_round_seed = tff.federated_map(make_round_seed,
                                        state.finalizer['round_num'])
    client_weights = tff.federated_broadcast(state.global_model_weights)
    client_seed = tff.federated_broadcast(this_round_seed)
    outputs = tff.federated_map(client_work,
                                (client_weights, client_seed, client_data))
    if weighted or per_client:
      agg = aggregator.next(state.aggregator, outputs['update'],
                            outputs['weight'])
    else:
      agg = aggregator.next(state.aggregator, outputs['update'])
    train = fm.aggregate_metrics(metrics_aggregator, model,
                                 outputs['metrics'])
    updated = tff.federated_map(server_update, (
        state.global_model_weights, state.finalizer, agg.result,
        this_round_seed))
    empty = tff.federated_value((), tff.SERVER)
    new_state = tff.federated_zip(_STATE(
        global_model_weights=updated[0], distributor=empty, client_work=empty,
        aggregator=agg.state, finalizer=updated[1]))
    metrics = tff.federated_zip(collections.OrderedDict(
        distributor=empty,
        client_work=tff.federated_zip(collections.OrderedDict(train=train)),
        aggregator=agg.measurements,
        finalizer=tff.federated_zip(collections.OrderedDict(
            update_non_finite=updated[2])),
        gradient_estimate=tff.federated_zip(collections.OrderedDict(
            norm=updated[3]))))
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)

  state_member = state_type.member

  @tff.tensorflow.computation(state_member)
  def get_model_weights(state):
    if ema_decay is None:
      return state.global_model_weights
    return tff.learning.models.ModelWeights(
        trainable=state.finalizer['ema_weights'],
        non_trainable=state.global_model_weights.non_trainable)

  @tff.tensorflow.computation(state_member, state_member.global_model_weights)
  def set_model_weights(state, model_weights):
    finalizer = collections.OrderedDict(state.finalizer)
    if ema_decay is not None:
      finalizer['ema_weights'] = model_weights.trainable
    return _STATE(global_model_weights=model_weights,
                  distributor=state.distributor,
                  client_work=state.client_work, aggregator=state.aggregator,
                  finalizer=finalizer)

  @tff.tensorflow.computation(state_member)
  def get_hparams(state):
    return collections.OrderedDict(
        client_work=collections.OrderedDict(),
        finalizer=server_optimizer.get_hparams(state.finalizer['optimizer']))

  @tff.tensorflow.computation(state_member, get_hparams.type_signature.result)
  def set_hparams(state, hparams):
    finalizer = collections.OrderedDict(state.finalizer)
    finalizer['optimizer'] = server_optimizer.set_hparams(
        finalizer['optimizer'], hparams['finalizer'])
    return _STATE(global_model_weights=state.global_model_weights,
                  distributor=state.distributor,
                  client_work=state.client_work, aggregator=state.aggregator,
                  finalizer=finalizer)

  return tff.learning.templates.LearningProcess(
      initialize_fn, next_fn, get_model_weights, set_model_weights,
      get_hparams_fn=get_hparams, set_hparams_fn=set_hparams)


def round_privacy_report(
    model_fn: fm.ModelArg,
    *,
    num_perturbations: int,
    model_aggregator: AggregationFactory,
    mode: str = 'fedsgd',
    metrics_released: bool = True,
    sampling_rate: float,
    rounds: int,
    delta: float,
) -> aggregation.PrivacyReport:
  """(epsilon, delta) of `rounds` rounds of `build_baffle` with shared
  directions and this `model_aggregator`.

  A round releases the clients' uploads through `model_aggregator` (K
  scores in `'fedsgd'`, a model delta in `'one_epoch'`; its DP event as
  the factory reports it) and, unless `metrics_released=False` (the process
  built with `metrics_aggregator=functional_models.release_no_metrics`), the
  clients' training metrics, a plain sum that makes epsilon infinite (the
  report names it). Per-client directions take no aggregator: the server
  sees each client's scores.
  """
  model = fm.resolve_model(model_fn, 'round_privacy_report')
  if mode == 'fedsgd':
    update_type = tff.TensorType(np.float32, [num_perturbations])
  else:
    update_type = fm.weights_type(model).trainable
  found = [aggregation.factory_release(
      f'{"scores" if mode == "fedsgd" else "model delta"} (model_aggregator)',
      model_aggregator, update_type)]
  if metrics_released:
    found.append(aggregation.Release(
        'client_work/train metrics (metrics_aggregator)', 'value', 'plain'))
  return aggregation.releases_report(found, mode='primal',
                                     sampling_rate=sampling_rate,
                                     rounds=rounds, delta=delta)
