"""Server optimizers and learning-rate schedules TFF does not ship.

`tff.learning.optimizers` has SGD with heavy-ball momentum (`build_sgdm`)
and `schedule_learning_rate`, which sets an optimizer's rate from a function
of its step count. This module adds SGD with Nesterov momentum and the
warm-up and decay schedules that zeroth-order training (BAFFLE with many
cheap rounds) needs, as TFF objects, so they plug into any process that
takes a `tff.learning.optimizers.Optimizer`.
"""

import collections
import math
from typing import Any, Callable

import tensorflow as tf
import tensorflow_federated as tff

SCHEDULES = ('constant', 'cosine', 'linear')

_LEARNING_RATE = tff.learning.optimizers.LEARNING_RATE_KEY


class _NesterovSGD(tff.learning.optimizers.Optimizer):
  """SGD with Nesterov momentum; see `build_nesterov_sgdm`."""

  def __init__(self, learning_rate: float, momentum: float):
    self._learning_rate = learning_rate
    self._momentum = momentum

  def initialize(self, specs: Any) -> collections.OrderedDict:
    return collections.OrderedDict([
        (_LEARNING_RATE, self._learning_rate),
        ('momentum', self._momentum),
        ('accumulator', tf.nest.map_structure(
            lambda s: tf.zeros(s.shape, s.dtype), specs)),
    ])

  def next(self, state, weights, gradients):
    tff.learning.optimizers.check_weights_gradients_match(weights, gradients)
    learning_rate, momentum = state[_LEARNING_RATE], state['momentum']

    def update(w, a, g):
      a = momentum * a + g
      return w - learning_rate * (g + momentum * a), a

    flat = [update(w, a, g) for w, a, g in zip(
        tf.nest.flatten(weights), tf.nest.flatten(state['accumulator']),
        tf.nest.flatten(gradients))]
    new_weights = tf.nest.pack_sequence_as(weights, [w for w, _ in flat])
    accumulator = tf.nest.pack_sequence_as(state['accumulator'],
                                           [a for _, a in flat])
    return collections.OrderedDict([
        (_LEARNING_RATE, learning_rate), ('momentum', momentum),
        ('accumulator', accumulator)]), new_weights

  def get_hparams(self, state):
    return collections.OrderedDict(
        [(k, state[k]) for k in (_LEARNING_RATE, 'momentum')])

  def set_hparams(self, state, hparams):
    new_state = collections.OrderedDict(state)
    new_state.update(hparams)
    return new_state


def build_nesterov_sgdm(learning_rate: float = 0.01,
                        momentum: float = 0.9
                        ) -> tff.learning.optimizers.Optimizer:
  """SGD with Nesterov momentum (Sutskever et al., 2013), as torch's.

  With velocity `v`: `v = momentum * v + g; w = w - lr * (g + momentum * v)`
  (torch's `SGD(nesterov=True)`; TFF's `build_sgdm` is the heavy-ball
  `w = w - lr * v`). The state keeps the rate under TFF's
  `LEARNING_RATE_KEY`, so `tff.learning.optimizers.schedule_learning_rate`
  applies.

  Args:
    learning_rate: A non-negative rate.
    momentum: In `[0, 1)`.

  Raises:
    ValueError: For a negative rate or a momentum outside `[0, 1)`.
  """
  if not learning_rate >= 0:
    raise ValueError(f'learning_rate must be >= 0, got {learning_rate!r}.')
  if not 0 <= momentum < 1:
    raise ValueError(f'momentum must be in [0, 1), got {momentum!r}.')
  return _NesterovSGD(learning_rate, momentum)


def learning_rate_schedule(learning_rate: float, total_steps: int,
                           decay: str = 'constant', warmup_steps: int = 0
                           ) -> Callable[[Any], tf.Tensor]:
  """Step -> rate: linear warm-up, then constant, cosine or linear decay.

  For step `i` (0-based; TFF's `schedule_learning_rate` passes the number
  of steps taken): `learning_rate * (i + 1) / warmup_steps` while
  `i < warmup_steps`; after it, with `p = (i - warmup_steps) /
  (total_steps - warmup_steps)` capped at 1, `learning_rate` times 1
  (`'constant'`), `(1 + cos(pi p)) / 2` (`'cosine'`) or `1 - p`
  (`'linear'`). The function takes a Python int or an integer tensor.

  Args:
    learning_rate: The peak rate.
    total_steps: Steps of the whole run (the decay ends there).
    decay: One of `SCHEDULES`.
    warmup_steps: Steps of linear warm-up; 0 for none.

  Raises:
    ValueError: For an unknown `decay` or steps out of range.
  """
  if decay not in SCHEDULES:
    raise ValueError(f'decay must be one of {SCHEDULES}, got {decay!r}.')
  if total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {total_steps!r}.')
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'warmup_steps must be in [0, total_steps={total_steps})'
                     f', got {warmup_steps!r}.')
  decay_steps = float(total_steps - warmup_steps)

  def schedule(step):
    step = tf.cast(step, tf.float32)
    progress = tf.clip_by_value((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if decay == 'cosine':
      factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
    elif decay == 'linear':
      factor = 1.0 - progress
    else:
      factor = tf.ones_like(progress)
    if warmup_steps:
      factor = tf.where(step < warmup_steps, (step + 1.0) / warmup_steps,
                        factor)
    return learning_rate * factor

  return schedule
