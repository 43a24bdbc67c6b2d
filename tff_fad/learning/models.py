"""Functional image classifiers: BAFFLE's LeNet and a WRN-10-2.

Models here are pure functions of a flat list of parameter tensors,
`apply(params, x) -> logits`, because forward-only training (BAFFLE)
evaluates the loss at perturbed parameters `w + sigma * z` many times per step:
with a pure `apply` a perturbed model is just another list of tensors, with no
variable assignment and no model copies. `to_functional_model` wraps a
`FunctionalNet` as a `tff.learning.models.FunctionalModel` for TFF.

Every net here also has `apply_stacked(stacked_params, x)`: the logits of P
parameter sets (each parameter with a leading axis of P) on one batch, in one
batched pass. The P copies of a layer's activations sit side by side in the
channel axis (`[B, H, W, P * C]`), so a convolution of all P copies is one
grouped `tf.nn.conv2d` (P groups), the first layer reads the shared input
once, GroupNorm's groups are P times as many, and the dense head is one
batched matmul. BAFFLE evaluates its perturbed models so.

Initialization follows PyTorch's defaults (BAFFLE's official code is PyTorch):
weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scales 1, shifts 0.
"""

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

Params = Sequence[tf.Tensor]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Name, shape and PyTorch-style fan-in (0 for norm scale/shift) of one parameter."""

  name: str
  shape: tuple[int, ...]
  fan_in: int
  kind: str  # 'weight', 'bias', 'scale' or 'shift'.


@dataclasses.dataclass(frozen=True)
class FunctionalNet:
  """A model as parameter specs plus a pure function.

  Attributes:
    name: Model name, e.g. `'lenet'`.
    param_specs: The parameters, in the order `apply` expects them.
    apply: `apply(params, x) -> logits`; `x` is float32 `[B, H, W, C]`.
    apply_stacked: `apply_stacked(stacked_params, x) -> [P, B, classes]`
      logits of P parameter sets at once (each parameter `[P, *shape]`), the
      same values as P calls of `apply` up to float32 rounding; None if the
      net has no batched form (`stacked_logits` then vectorizes `apply`).
  """

  name: str
  param_specs: tuple[ParamSpec, ...]
  apply: Callable[[Params, tf.Tensor], tf.Tensor]
  apply_stacked: Optional[Callable[[Params, tf.Tensor], tf.Tensor]] = None

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(s.shape)) for s in self.param_specs)

  def init(self, seed: int) -> list[np.ndarray]:
    """Returns freshly initialized float32 parameters (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    params = []
    for spec in self.param_specs:
      if spec.kind == 'scale':
        value = np.ones(spec.shape)
      elif spec.kind == 'shift':
        value = np.zeros(spec.shape)
      else:
        bound = 1.0 / np.sqrt(spec.fan_in)
        value = rng.uniform(-bound, bound, size=spec.shape)
      params.append(value.astype(np.float32))
    return params


def hardswish(x: tf.Tensor) -> tf.Tensor:
  """x * relu6(x + 3) / 6, the activation of BAFFLE's models."""
  return x * tf.nn.relu6(x + 3.0) / 6.0


# BAFFLE's models use Hardswish, which has no kink for a finite difference
# to straddle; `relu` is there to compare (README: the paper's table).
ACTIVATIONS = {'hardswish': hardswish, 'relu': tf.nn.relu}


def _activation(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
  if name not in ACTIVATIONS:
    raise ValueError(f'activation must be one of {tuple(ACTIVATIONS)}, got '
                     f'{name!r}.')
  return ACTIVATIONS[name]


def group_norm(x: tf.Tensor, scale: tf.Tensor, shift: tf.Tensor,
               num_groups: int, epsilon: float = 1e-5) -> tf.Tensor:
  """GroupNorm over `[B, H, W, C]` (no batch statistics, so no state)."""
  b, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
  c = x.shape[-1]
  grouped = tf.reshape(x, [b, h, w, num_groups, c // num_groups])
  mean, variance = tf.nn.moments(grouped, axes=[1, 2, 4], keepdims=True)
  grouped = (grouped - mean) * tf.math.rsqrt(variance + epsilon)
  return tf.reshape(grouped, [b, h, w, c]) * scale + shift


def _num_stacked(stacked_params: Params) -> int:
  """P, the leading dimension of stacked parameters (static)."""
  return int(stacked_params[0].shape[0])


def stacked_conv2d(x: tf.Tensor, kernels: tf.Tensor, stride: int,
                   padding) -> tf.Tensor:
  """P convolutions in one grouped `tf.nn.conv2d`.

  Args:
    x: `[B, H, W, C]` (one input shared by the P kernels, e.g. the images) or
      `[B, H, W, P * C]` (P inputs side by side in the channel axis).
    kernels: `[P, k, k, C, C_out]`.
    stride: As `tf.nn.conv2d`.
    padding: As `tf.nn.conv2d`.

  Returns:
    `[B, H', W', P * C_out]`: copy p's output is channels
    `[p * C_out, (p + 1) * C_out)`.
  """
  p, k1, k2, c_in, c_out = kernels.shape
  # [k, k, C, P * C_out]; with P * C input channels TF convolves P groups.
  kernel = tf.reshape(tf.transpose(kernels, [1, 2, 3, 0, 4]),
                      [k1, k2, c_in, p * c_out])
  return tf.nn.conv2d(x, kernel, stride, padding)


def stacked_channels(v: tf.Tensor) -> tf.Tensor:
  """`[P, C]` per-channel parameters -> `[P * C]`, matching `stacked_conv2d`."""
  return tf.reshape(v, [-1])


def stacked_dense(x: tf.Tensor, kernels: tf.Tensor,
                  biases: tf.Tensor) -> tf.Tensor:
  """`[B, P * C]` features, `[P, C, O]` kernels -> `[P, B, O]` outputs."""
  p, c, _ = kernels.shape
  x = tf.reshape(x, [-1, p, c])
  return tf.einsum('bpc,pco->pbo', x, kernels) + biases[:, tf.newaxis, :]


def stacked_logits(net: FunctionalNet, stacked_params: Params,
                   x: tf.Tensor) -> tf.Tensor:
  """`[P, B, classes]` logits of P parameter sets (see `FunctionalNet`)."""
  if net.apply_stacked is not None:
    return net.apply_stacked(stacked_params, x)
  return tf.vectorized_map(lambda params: net.apply(params, x),
                           list(stacked_params))


def _conv_specs(name: str, k: int, c_in: int, c_out: int,
                bias: bool = True) -> list[ParamSpec]:
  fan_in = k * k * c_in
  specs = [ParamSpec(f'{name}/kernel', (k, k, c_in, c_out), fan_in, 'weight')]
  if bias:
    specs.append(ParamSpec(f'{name}/bias', (c_out,), fan_in, 'bias'))
  return specs


def _norm_specs(name: str, c: int) -> list[ParamSpec]:
  return [ParamSpec(f'{name}/scale', (c,), 0, 'scale'),
          ParamSpec(f'{name}/shift', (c,), 0, 'shift')]


def _dense_specs(name: str, c_in: int, c_out: int) -> list[ParamSpec]:
  return [ParamSpec(f'{name}/kernel', (c_in, c_out), c_in, 'weight'),
          ParamSpec(f'{name}/bias', (c_out,), c_in, 'bias')]


def lenet(in_channels: int = 1, num_classes: int = 10,
          group_norm_groups: int = 0,
          activation: str = 'hardswish') -> FunctionalNet:
  """BAFFLE's LeNet: conv5x5(16, pad 2) - maxpool - conv5x5(64) - GAP - dense.

  Hardswish (or `activation`) after each convolution; with
  `group_norm_groups > 0`, GroupNorm
  after each convolution (before the activation). The global average pool
  makes the parameter count independent of the input size. For 1x32x32
  inputs and no norm:

    conv1  5*5*1*16 + 16  =    416
    conv2  5*5*16*64 + 64 = 25,664
    dense  64*10 + 10     =    650
    total                 = 26,730

  Args:
    in_channels: Input channels (1 for digits).
    num_classes: Output classes.
    group_norm_groups: Groups of the optional GroupNorm; 0 disables it.
    activation: A key of `ACTIVATIONS`.

  Returns:
    A `FunctionalNet` taking `[B, H, W, in_channels]` images.
  """
  act = _activation(activation)
  norm = group_norm_groups > 0
  specs = _conv_specs('conv1', 5, in_channels, 16)
  if norm:
    specs += _norm_specs('norm1', 16)
  specs += _conv_specs('conv2', 5, 16, 64)
  if norm:
    specs += _norm_specs('norm2', 64)
  specs += _dense_specs('dense', 64, num_classes)

  def apply(params: Params, x: tf.Tensor) -> tf.Tensor:
    p = iter(params)
    x = tf.nn.conv2d(x, next(p), 1, [[0, 0], [2, 2], [2, 2], [0, 0]]) + next(p)
    if norm:
      x = group_norm(x, next(p), next(p), group_norm_groups)
    x = tf.nn.max_pool2d(act(x), 2, 2, 'VALID')
    x = tf.nn.conv2d(x, next(p), 1, 'VALID') + next(p)
    if norm:
      x = group_norm(x, next(p), next(p), group_norm_groups)
    x = tf.reduce_mean(act(x), axis=[1, 2])
    return tf.matmul(x, next(p)) + next(p)

  def apply_stacked(params: Params, x: tf.Tensor) -> tf.Tensor:
    num = _num_stacked(params)
    p = iter(params)
    x = stacked_conv2d(x, next(p), 1, [[0, 0], [2, 2], [2, 2], [0, 0]]
                       ) + stacked_channels(next(p))
    if norm:
      x = group_norm(x, stacked_channels(next(p)), stacked_channels(next(p)),
                     num * group_norm_groups)
    x = tf.nn.max_pool2d(act(x), 2, 2, 'VALID')
    x = stacked_conv2d(x, next(p), 1, 'VALID') + stacked_channels(next(p))
    if norm:
      x = group_norm(x, stacked_channels(next(p)), stacked_channels(next(p)),
                     num * group_norm_groups)
    x = tf.reduce_mean(act(x), axis=[1, 2])
    return stacked_dense(x, next(p), next(p))

  return FunctionalNet('lenet', tuple(specs), apply, apply_stacked)


def wide_resnet(depth: int = 10, width: int = 2, in_channels: int = 1,
                num_classes: int = 10, group_norm_groups: int = 8,
                activation: str = 'hardswish') -> FunctionalNet:
  """Pre-activation Wide ResNet WRN-depth-width (Zagoruyko & Komodakis).

  Three groups of `(depth - 4) / 6` basic blocks with `16*width`, `32*width`,
  `64*width` channels (strides 1, 2, 2) after a 3x3 stem of 16 channels; 1x1
  projection shortcuts where the shape changes; GroupNorm instead of batch
  norm (BAFFLE avoids batch statistics: perturbed forward passes must see the
  same normalization), Hardswish, global average pool, dense.

  Args:
    depth: 6n + 4 (10 gives one block per group).
    width: Widening factor.
    in_channels: Input channels.
    num_classes: Output classes.
    group_norm_groups: Groups of each GroupNorm; 0 disables normalization.
    activation: A key of `ACTIVATIONS`.

  Returns:
    A `FunctionalNet`.
  """
  act = _activation(activation)
  if (depth - 4) % 6 or depth < 10:
    raise ValueError(f'depth must be 6n + 4 with n >= 1, got {depth}.')
  blocks_per_group = (depth - 4) // 6
  norm = group_norm_groups > 0
  specs = _conv_specs('stem', 3, in_channels, 16, bias=False)
  # (name, c_in, c_out, stride, has_projection) for every block.
  plan = []
  c_in = 16
  for g, (c, stride) in enumerate(zip([16 * width, 32 * width, 64 * width],
                                      [1, 2, 2])):
    for b in range(blocks_per_group):
      s = stride if b == 0 else 1
      plan.append((f'group{g}/block{b}', c_in, c, s, c_in != c or s != 1))
      c_in = c
  for name, ci, co, _, projection in plan:
    if norm:
      specs += _norm_specs(f'{name}/norm1', ci)
    specs += _conv_specs(f'{name}/conv1', 3, ci, co, bias=False)
    if norm:
      specs += _norm_specs(f'{name}/norm2', co)
    specs += _conv_specs(f'{name}/conv2', 3, co, co, bias=False)
    if projection:
      specs += _conv_specs(f'{name}/shortcut', 1, ci, co, bias=False)
  if norm:
    specs += _norm_specs('final_norm', c_in)
  specs += _dense_specs('dense', c_in, num_classes)

  def norm_act(x, p):
    if norm:
      x = group_norm(x, next(p), next(p), group_norm_groups)
    return act(x)

  def apply(params: Params, x: tf.Tensor) -> tf.Tensor:
    p = iter(params)
    x = tf.nn.conv2d(x, next(p), 1, 'SAME')
    for _, _, _, stride, projection in plan:
      y = norm_act(x, p)
      # Pre-activation: a projection shortcut reads the normalized input.
      shortcut_input = y if projection else x
      y = tf.nn.conv2d(y, next(p), stride, 'SAME')
      y = norm_act(y, p)
      y = tf.nn.conv2d(y, next(p), 1, 'SAME')
      if projection:
        x = tf.nn.conv2d(shortcut_input, next(p), stride, 'SAME')
      x = x + y
    x = tf.reduce_mean(norm_act(x, p), axis=[1, 2])
    return tf.matmul(x, next(p)) + next(p)

  def apply_stacked(params: Params, x: tf.Tensor) -> tf.Tensor:
    num = _num_stacked(params)
    p = iter(params)

    def stacked_norm_act(x):
      if norm:
        x = group_norm(x, stacked_channels(next(p)),
                       stacked_channels(next(p)), num * group_norm_groups)
      return act(x)

    x = stacked_conv2d(x, next(p), 1, 'SAME')
    for _, _, _, stride, projection in plan:
      y = stacked_norm_act(x)
      shortcut_input = y if projection else x
      y = stacked_conv2d(y, next(p), stride, 'SAME')
      y = stacked_norm_act(y)
      y = stacked_conv2d(y, next(p), 1, 'SAME')
      if projection:
        x = stacked_conv2d(shortcut_input, next(p), stride, 'SAME')
      x = x + y
    x = tf.reduce_mean(stacked_norm_act(x), axis=[1, 2])
    return stacked_dense(x, next(p), next(p))

  return FunctionalNet(f'wrn{depth}_{width}', tuple(specs), apply,
                       apply_stacked)


def linear(image_shape: Sequence[int], num_classes: int = 10) -> FunctionalNet:
  """Softmax regression on flattened images: `(H*W*C + 1) * classes` params.

  Zeroth-order training needs a number of forward passes that grows with the
  parameter count (the cosine of a K-direction estimate to the gradient is
  about sqrt(K / n)), so this small model is what trains in a short demo.
  """
  num_features = int(np.prod(image_shape))
  specs = (ParamSpec('dense/kernel', (num_features, num_classes), num_features,
                     'weight'),
           ParamSpec('dense/bias', (num_classes,), num_features, 'bias'))

  def apply(params: Params, x: tf.Tensor) -> tf.Tensor:
    return tf.matmul(tf.reshape(x, [-1, num_features]), params[0]) + params[1]

  def apply_stacked(params: Params, x: tf.Tensor) -> tf.Tensor:
    return tf.einsum('bf,pfo->pbo', tf.reshape(x, [-1, num_features]),
                     params[0]) + params[1][:, tf.newaxis, :]

  return FunctionalNet('linear', specs, apply, apply_stacked)


MODEL_NAMES = ('lenet', 'wrn', 'linear')


def get_net(name: str, image_shape: Sequence[int], num_classes: int = 10,
            activation: str = 'hardswish') -> FunctionalNet:
  """Returns `'lenet'`, `'wrn'` (WRN-10-2) or `'linear'` for `[H, W, C]` images.

  `activation` (a key of `ACTIVATIONS`) is that of LeNet and WRN.
  """
  if name == 'lenet':
    return lenet(image_shape[-1], num_classes, activation=activation)
  if name == 'wrn':
    return wide_resnet(10, 2, image_shape[-1], num_classes,
                       activation=activation)
  if name == 'linear':
    return linear(image_shape, num_classes)
  raise ValueError(f'model must be one of {MODEL_NAMES}, got {name!r}.')


def sparse_softmax_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Mean cross-entropy of integer labels."""
  return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.cast(tf.reshape(labels, [-1]), tf.int32), logits=logits))


def _accuracy_metric_fns():
  """Functional metrics: summed loss, correct predictions and examples."""

  def initialize():
    return collections.OrderedDict(
        loss_sum=tf.constant(0.0), num_correct=tf.constant(0.0),
        num_examples=tf.constant(0.0))

  def update(state, labels, batch_output, sample_weight=None):
    del sample_weight  # Unused.
    # TFF's own algorithms pass a BatchOutput; tff_fad's pass the logits.
    batch_output = getattr(batch_output, 'predictions', batch_output)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    n = tf.cast(tf.shape(labels)[0], tf.float32)
    correct = tf.cast(tf.equal(
        tf.argmax(batch_output, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
    return collections.OrderedDict(
        loss_sum=state['loss_sum'] + sparse_softmax_loss(batch_output,
                                                         labels) * n,
        num_correct=state['num_correct'] + tf.reduce_sum(correct),
        num_examples=state['num_examples'] + n)

  def finalize(state):
    n = tf.maximum(state['num_examples'], 1.0)
    return collections.OrderedDict(
        loss=state['loss_sum'] / n,
        accuracy=state['num_correct'] / n,
        num_examples=state['num_examples'])

  return initialize, update, finalize


class StackedFunctionalModel(tff.learning.models.FunctionalModel):
  """A `FunctionalModel` that also predicts for P weight sets in one pass.

  `predict_on_stacked_batch((stacked_trainable, non_trainable), x, training)`
  returns `[P, B, ...]` predictions, each trainable weight given as
  `[P, *shape]`. Everything else is TFF's `FunctionalModel`; code that does
  not know the method (TFF's own algorithms) sees a plain one.
  """

  def __init__(self, *, predict_on_stacked_batch_fn, **kwargs):
    super().__init__(**kwargs)
    self._predict_on_stacked_batch_fn = predict_on_stacked_batch_fn

  def predict_on_stacked_batch(self, model_weights, x, training=True):
    return self._predict_on_stacked_batch_fn(model_weights, x, training)


def to_functional_model(net: FunctionalNet, image_shape: Sequence[int],
                        seed: int = 0) -> StackedFunctionalModel:
  """Wraps `net` as a `tff.learning.models.FunctionalModel`.

  All parameters are trainable (the models have no non-trainable state).
  Batches are `OrderedDict(x=float32[B, *image_shape], y=int32[B])`. The
  model also has `predict_on_stacked_batch` (`net`'s `stacked_logits`).

  Args:
    net: The network.
    image_shape: `(H, W, C)` of one input image.
    seed: Seed of the initial weights.

  Returns:
    A `FunctionalModel` with loss = mean cross-entropy and metrics
    `loss`, `accuracy`, `num_examples`.
  """
  initial_weights = (tuple(net.init(seed)), ())

  @tf.function
  def predict_on_batch(model_weights, x, training=True):
    del training  # No dropout or batch norm.
    return net.apply(model_weights[0], x)

  @tf.function
  def predict_on_stacked_batch(model_weights, x, training=True):
    del training  # No dropout or batch norm.
    return stacked_logits(net, model_weights[0], x)

  def loss(output, label, sample_weight=None):
    del sample_weight  # Unused.
    return sparse_softmax_loss(output, label)

  input_spec = collections.OrderedDict(
      x=tf.TensorSpec([None, *image_shape], tf.float32),
      y=tf.TensorSpec([None], tf.int32))
  return StackedFunctionalModel(
      predict_on_stacked_batch_fn=predict_on_stacked_batch,
      initial_weights=initial_weights,
      predict_on_batch_fn=predict_on_batch,
      loss_fn=loss,
      metrics_fns=_accuracy_metric_fns(),
      input_spec=input_spec)
