"""Derivatives of placement-local TensorFlow functions.

The federated rules (broadcast <-> sum) move derivatives between placements;
what happens *at* a placement is ordinary TensorFlow AD, collected here:
forward mode with `tf.autodiff.ForwardAccumulator`, reverse mode with
`tf.GradientTape`. Both work on nested structures and run inside
`tff.tensorflow.computation` (graph mode). BAFFLE's forward-gradient
estimator uses `jvp` too: it is Federated AD's forward mode with random
tangents.

Conventions: a tangent or cotangent has the structure of its value; leaves
that are not floating point carry a structural zero (see `types.py`).
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from tff_fad.core import types as fad_types

_ZERO = tf.UnconnectedGradients.ZERO


def _is_float(x) -> bool:
  return tf.as_dtype(x.dtype).is_floating


def structural_zero(num_directions: Optional[int] = None) -> tf.Tensor:
  shape = [] if num_directions is None else [num_directions]
  return tf.zeros(shape, dtype=fad_types.STRUCTURAL_ZERO_DTYPE)


def zeros_like_tangent(value: Any, num_directions: Optional[int] = None) -> Any:
  """A zero tangent for `value` (float leaves: zeros; others: structural)."""

  def leaf(x):
    x = tf.convert_to_tensor(x)
    if not _is_float(x):
      return structural_zero(num_directions)
    if num_directions is None:
      return tf.zeros_like(x)
    return tf.zeros(tf.concat([[num_directions], tf.shape(x)], 0), x.dtype)

  return tf.nest.map_structure(leaf, value)


def _watched_pairs(
    primals: Sequence[Any], tangents: Sequence[Optional[Any]]
) -> Tuple[List[tf.Tensor], List[tf.Tensor]]:
  """Float primal leaves of the active arguments, with their tangent leaves."""
  watched, watched_tangents = [], []
  for primal, tangent in zip(primals, tangents):
    if tangent is None:
      continue
    primal_leaves = tf.nest.flatten(primal)
    tangent_leaves = tf.nest.flatten(tangent)
    if len(primal_leaves) != len(tangent_leaves):
      raise ValueError(
          f'Tangent structure {tangent} does not match primal structure '
          f'{primal}.'
      )
    for p, t in zip(primal_leaves, tangent_leaves):
      if _is_float(p):
        watched.append(p)
        watched_tangents.append(tf.cast(t, p.dtype))
  return watched, watched_tangents


def jvp(
    fn: Callable[..., Any],
    primals: Sequence[Any],
    tangents: Sequence[Optional[Any]],
    num_directions: Optional[int] = None,
) -> Tuple[Any, Any]:
  """Forward-mode derivative of `fn(*primals)` along `tangents`.

  Args:
    fn: A TensorFlow function of `len(primals)` positional arguments.
    primals: The arguments (nested structures of tensors).
    tangents: One tangent per argument, or `None` for arguments held
      constant. With `num_directions=k`, every tangent leaf has a leading
      axis of size `k` (one direction per row).
    num_directions: `None` for a single direction, else `k`.

  Returns:
    `(outputs, output_tangents)`; with `k` directions the output tangents
    have a leading axis of size `k`.
  """
  primals = [tf.nest.map_structure(tf.convert_to_tensor, p) for p in primals]
  watched, watched_tangents = _watched_pairs(primals, tangents)

  def tangent_of(acc, outputs, k):
    def leaf(o):
      if not _is_float(o):
        return structural_zero(k)
      return acc.jvp(o, unconnected_gradients=_ZERO)

    return tf.nest.map_structure(leaf, outputs)

  if num_directions is None:
    with tf.autodiff.ForwardAccumulator(watched, watched_tangents) as acc:
      outputs = tf.nest.map_structure(tf.convert_to_tensor, fn(*primals))
    return outputs, tangent_of(acc, outputs, None)

  outputs = tf.nest.map_structure(tf.convert_to_tensor, fn(*primals))
  float_outputs = [o for o in tf.nest.flatten(outputs) if _is_float(o)]

  def one_direction(direction):
    with tf.autodiff.ForwardAccumulator(watched, direction) as acc:
      outs = tf.nest.flatten(fn(*primals))
    return [
        acc.jvp(tf.convert_to_tensor(o), unconnected_gradients=_ZERO)
        for o in outs
        if _is_float(tf.convert_to_tensor(o))
    ]

  # tf.map_fn keeps the graph size independent of k (one loop body).
  batched = tf.map_fn(
      one_direction,
      watched_tangents,
      fn_output_signature=[
          tf.TensorSpec(o.shape, o.dtype) for o in float_outputs
      ],
  )
  batched = iter(batched)
  output_tangents = tf.nest.map_structure(
      lambda o: next(batched) if _is_float(o) else structural_zero(
          num_directions
      ),
      outputs,
  )
  return outputs, output_tangents


def vjp(
    fn: Callable[..., Any],
    primals: Sequence[Any],
    active: Sequence[bool],
    output_cotangent: Any,
) -> Tuple[Any, List[Optional[Any]]]:
  """Reverse-mode derivative of `fn(*primals)` against `output_cotangent`.

  Args:
    fn: A TensorFlow function of `len(primals)` positional arguments.
    primals: The arguments (nested structures of tensors).
    active: Which arguments get a cotangent.
    output_cotangent: A structure matching `fn`'s output.

  Returns:
    `(outputs, input_cotangents)`, with `None` for inactive arguments.
  """
  primals = [tf.nest.map_structure(tf.convert_to_tensor, p) for p in primals]
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    watched = []
    for primal, is_active in zip(primals, active):
      if is_active:
        for leaf in tf.nest.flatten(primal):
          if _is_float(leaf):
            tape.watch(leaf)
            watched.append(leaf)
    outputs = tf.nest.map_structure(tf.convert_to_tensor, fn(*primals))
  targets, target_cotangents = [], []
  for o, ct in zip(
      tf.nest.flatten(outputs), tf.nest.flatten(output_cotangent)
  ):
    if _is_float(o):
      targets.append(o)
      target_cotangents.append(tf.cast(ct, o.dtype))
  grads = iter(
      tape.gradient(
          targets,
          watched,
          output_gradients=target_cotangents,
          unconnected_gradients=_ZERO,
      )
      if watched
      else []
  )
  cotangents = []
  for primal, is_active in zip(primals, active):
    if not is_active:
      cotangents.append(None)
      continue
    cotangents.append(
        tf.nest.map_structure(
            lambda p: next(grads) if _is_float(p) else structural_zero(),
            primal,
        )
    )
  return outputs, cotangents
