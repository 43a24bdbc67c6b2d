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

import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from tff_fad.core import errors
from tff_fad.core import types as fad_types

_ZERO = tf.UnconnectedGradients.ZERO
# Batched directions up to this many are unrolled (differentiable again in
# forward mode); more use one tf.map_fn loop body, whose graph stays small
# but which only reverse mode can differentiate again.
UNROLLED_DIRECTIONS = 32


def _is_float(x) -> bool:
  return isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype.is_floating


def _as_tensors(structure: Any) -> Any:
  """Converts leaves to tensors; datasets (client data) stay as they are."""
  return tf.nest.map_structure(
      lambda x: x if isinstance(x, tf.data.Dataset) else tf.convert_to_tensor(x),
      structure)


# Ops whose integer outputs describe a tensor rather than compute from its
# values: their derivative is rightly zero.
_SHAPE_OPS = frozenset({'Shape', 'ShapeN', 'Size', 'Rank', 'BroadcastArgs',
                        'BroadcastGradientArgs', 'TensorListLength'})


def warn_on_zero_derivative_ops(fn, sources, targets) -> None:
  """Warns about ops that cut the derivative path from `sources` to `targets`.

  An op on a path from a float source to a float target that turns floats
  into integers (`tf.argmax`, a cast to int, ...) has no derivative, and TF
  silently counts the derivative through it as zero. Graph mode only (the
  transforms trace local functions as graphs).
  """
  if tf.executing_eagerly() or not sources or not targets:
    return
  try:
    reaches_target, stack = set(), list(targets)
    while stack:
      t = stack.pop()
      if t.name in reaches_target:
        continue
      reaches_target.add(t.name)
      stack.extend(t.op.inputs)
    from_source, stack, found = set(), list(sources), []
    while stack:
      t = stack.pop()
      if t.name in from_source:
        continue
      from_source.add(t.name)
      for op in t.consumers():
        for out in op.outputs:
          if out.name not in reaches_target:
            continue
          if (t.dtype.is_floating and out.dtype.is_integer
              and op.type not in _SHAPE_OPS and op not in found):
            found.append(op)
          stack.append(out)
  except (AttributeError, ValueError):  # Not a graph tensor: nothing to walk.
    return
  for op in found:
    warnings.warn(
        f'tff_fad: the derivative of {getattr(fn, "__name__", fn)} does not '
        f'flow through {op.type} (op {op.name!r}): it turns floats into '
        'integers, so derivatives along that path are zero.',
        errors.ZeroDerivativeWarning, stacklevel=2)


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


class LocalFunction:
  """A TF function with hand-written local derivative rules.

  TF's AD cannot differentiate through iteration over a `tf.data.Dataset`
  (the usual form of client data in TFF). A function over a dataset can
  still take part in Federated AD if it states its rules: derivatives of a
  sum over batches are sums of per-batch derivatives, computed inside the
  loop. Use `with_derivatives` to build one.

  Attributes:
    fn: The function itself, called with positional arguments.
    jvp_rule: `(primals, tangents) -> (outputs, output_tangents)`, with
      `None` tangents for inactive arguments; one direction.
    vjp_rule: `(primals, active, output_cotangent) -> input_cotangents`,
      `None` for inactive arguments.
    batched_jvp: If True, `jvp_rule` is called once for every direction as
      `jvp_rule(primals, tangents, num_directions=k)`: with k directions
      every tangent leaf has a leading axis of size k (seeded tangents are
      generated for it) and so must the output tangents (`k=None`: one
      direction, no axis). Otherwise the rule is called once per direction,
      each call redoing `fn`'s work.
  """

  def __init__(self, fn, jvp_rule=None, vjp_rule=None,
               batched_jvp: bool = False):
    self.fn = fn
    self.jvp_rule = jvp_rule
    self.vjp_rule = vjp_rule
    self.batched_jvp = batched_jvp
    self.__name__ = getattr(fn, '__name__', 'local_function')

  def __call__(self, *args):
    return self.fn(*args)


def with_derivatives(fn, *, jvp=None, vjp=None,
                     batched_jvp: bool = False) -> LocalFunction:
  """Attaches forward (`jvp`) and/or reverse (`vjp`) rules to `fn`.

  See `LocalFunction` for the rule signatures. A mode whose rule is missing
  falls back to TF's AD, which is right for tensor-only functions. With
  `batched_jvp=True` the forward rule takes every direction at once (see
  `LocalFunction.batched_jvp`): `fn`'s work then runs once for k directions
  instead of k + 1 times.
  """
  if jvp is None and vjp is None:
    raise ValueError('with_derivatives needs a jvp rule, a vjp rule or both.')
  if batched_jvp and jvp is None:
    raise ValueError('batched_jvp=True needs a jvp rule.')
  return LocalFunction(fn, jvp, vjp, batched_jvp=batched_jvp)


def has_rule(fn, mode: str) -> bool:
  """True when `fn` brings its own rule for `mode` ('forward' or reverse)."""
  rule = 'jvp_rule' if mode == 'forward' else 'vjp_rule'
  return getattr(fn, rule, None) is not None


def _one_direction_jvp(fn, primals, tangents):
  if has_rule(fn, 'forward'):
    if fn.batched_jvp:
      outputs, output_tangents = fn.jvp_rule(primals, tangents,
                                             num_directions=None)
    else:
      outputs, output_tangents = fn.jvp_rule(primals, tangents)
    return _as_tensors(outputs), (
        _as_tensors(output_tangents))
  watched, watched_tangents = _watched_pairs(primals, tangents)
  with tf.autodiff.ForwardAccumulator(watched, watched_tangents) as acc:
    outputs = _as_tensors(fn(*primals))
  warn_on_zero_derivative_ops(
      fn, watched, [o for o in tf.nest.flatten(outputs) if _is_float(o)])

  def leaf(o):
    if not _is_float(o):
      return structural_zero()
    tangent = acc.jvp(o, unconnected_gradients=_ZERO)
    # A jvp computed through a nested tape can lose its static shape.
    return tf.ensure_shape(tangent, o.shape) if (
        tangent.shape != o.shape) else tangent

  return outputs, tf.nest.map_structure(leaf, outputs)


def ordered_leaves(structure: Any) -> List[Any]:
  """Leaves in declaration order (dicts in insertion order, unlike tf.nest,
  which sorts keys): the order of TFF's types."""
  if isinstance(structure, dict):
    return [x for v in structure.values() for x in ordered_leaves(v)]
  if isinstance(structure, (list, tuple)):
    return [x for v in structure for x in ordered_leaves(v)]
  return [structure]


def pack_ordered(structure: Any, leaves: Sequence[Any]) -> Any:
  """Inverse of `ordered_leaves`: `leaves` in `structure`'s containers."""
  remaining = iter(leaves)

  def build(x):
    if isinstance(x, dict):
      return type(x)((k, build(v)) for k, v in x.items())
    if hasattr(x, '_fields'):
      return type(x)(*[build(v) for v in x])
    if isinstance(x, (list, tuple)):
      return type(x)(build(v) for v in x)
    return next(remaining)

  return build(structure)


def _as_spec(x) -> tf.TensorSpec:
  if isinstance(x, tf.TensorSpec):
    return x
  return tf.TensorSpec(x.shape, tf.as_dtype(x.dtype))


def seeded_direction(seed: tf.Tensor, index: Any,
                     likes: Sequence[Any]) -> List[Any]:
  """Direction `index` of a seeded family: standard normal, from `seed` alone.

  One flat draw over the float leaves of every structure in `likes`, in
  declaration order, then split, so the values do not depend on how the
  leaves are grouped into tensors. A pure function of `(seed, index)`: the
  server and every client regenerate the same direction without sending it
  (`jvp(..., tangent_seed=True)` does; BAFFLE's directions are these).

  Args:
    seed: int64 `[2]` seed (stateless random ops).
    index: The direction's index (an int or int32 scalar).
    likes: One structure of tensors or `tf.TensorSpec`s per differentiated
      argument.

  Returns:
    One structure per entry of `likes`, in its containers; non-float leaves
    are structural zeros.
  """
  leaves = [[_as_spec(x) for x in ordered_leaves(like)] for like in likes]
  floats = [x for group in leaves for x in group if x.dtype.is_floating]
  sizes = [x.shape.num_elements() for x in floats]
  dtype = max((x.dtype for x in floats), key=lambda d: d.size,
              default=tf.float32)
  direction_seed = tf.random.experimental.stateless_fold_in(
      tf.cast(seed, tf.int64), index)
  flat = tf.random.stateless_normal([sum(sizes)], direction_seed, dtype=dtype)
  parts = iter(tf.split(flat, sizes) if sizes else [])
  out = []
  for like, group in zip(likes, leaves):
    values = [
        tf.cast(tf.reshape(next(parts), x.shape), x.dtype)
        if x.dtype.is_floating else structural_zero() for x in group]
    out.append(pack_ordered(like, values))
  return out


def seeded_tangents(seed: tf.Tensor, likes: Sequence[Any],
                    num_directions: int) -> List[Any]:
  """Directions `0..k-1` of `seeded_direction`, stacked on a leading axis."""
  per_direction = [seeded_direction(seed, d, likes)
                   for d in range(num_directions)]
  stacked = []
  for position, like in enumerate(likes):
    columns = zip(*[ordered_leaves(p[position]) for p in per_direction])
    stacked.append(pack_ordered(like, [tf.stack(c) for c in columns]))
  return stacked


class SeededTangent:
  """The tangent of one argument in a seeded family, generated on demand.

  Attributes:
    seed: The int64 `[2]` seed tensor.
    likes: Every seeded argument (values or specs), in order.
    position: Which of them this argument is.
  """

  def __init__(self, seed: tf.Tensor, likes: Sequence[Any], position: int):
    self.seed = seed
    self.likes = list(likes)
    self.position = position

  def direction(self, index) -> Any:
    return seeded_direction(self.seed, index, self.likes)[self.position]

  def stacked(self, num_directions: int) -> Any:
    """Directions `0..k-1`, stacked on a leading axis (k model copies)."""
    return seeded_tangents(self.seed, self.likes,
                           num_directions)[self.position]


def _direction(tangent, index):
  if tangent is None:
    return None
  if isinstance(tangent, SeededTangent):
    return tangent.direction(index)
  return tf.nest.map_structure(lambda x: x[index], tangent)


def jvp(
    fn: Callable[..., Any],
    primals: Sequence[Any],
    tangents: Sequence[Optional[Any]],
    num_directions: Optional[int] = None,
) -> Tuple[Any, Any]:
  """Forward-mode derivative of `fn(*primals)` along `tangents`.

  Args:
    fn: A TensorFlow function of `len(primals)` positional arguments, or a
      `LocalFunction` with its own forward rule.
    primals: The arguments (nested structures of tensors).
    tangents: One tangent per argument, or `None` for arguments held
      constant. With `num_directions=k`, every tangent leaf has a leading
      axis of size `k` (one direction per row), or the tangent is a
      `SeededTangent`, regenerated one direction at a time (never all k
      at once).
    num_directions: `None` for a single direction, else `k`.

  Returns:
    `(outputs, output_tangents)`; with `k` directions the output tangents
    have a leading axis of size `k`.
  """
  primals = [_as_tensors(p) for p in primals]
  if num_directions is None:
    return _one_direction_jvp(fn, primals, tangents)
  if has_rule(fn, 'forward') and fn.batched_jvp:
    stacked = [t.stacked(num_directions) if isinstance(t, SeededTangent)
               else t for t in tangents]
    outputs, output_tangents = fn.jvp_rule(primals, stacked,
                                           num_directions=num_directions)
    return _as_tensors(outputs), _as_tensors(output_tangents)

  outputs = _as_tensors(fn(*primals))
  is_float = [_is_float(o) for o in tf.nest.flatten(outputs)]
  explicit = [i for i, t in enumerate(tangents)
              if t is not None and not isinstance(t, SeededTangent)]

  if num_directions <= UNROLLED_DIRECTIONS:
    # One accumulator per direction: a graph TF can differentiate again in
    # either mode (forward mode cannot go through tf.map_fn's TensorLists).
    per_direction = [
        _one_direction_jvp(fn, primals,
                           [_direction(t, d) for t in tangents])[1]
        for d in range(num_directions)]
    output_tangents = tf.nest.map_structure(
        lambda o, *ts: tf.stack(ts) if _is_float(o) else structural_zero(
            num_directions), outputs, *per_direction)
    return outputs, output_tangents

  def one_direction(elements):
    index, direction = elements
    one = [_direction(t, index) if isinstance(t, SeededTangent) else t
           for t in tangents]
    for i, t in zip(explicit, direction):
      one[i] = t
    _, output_tangents = _one_direction_jvp(fn, primals, one)
    return [t for t, f in zip(tf.nest.flatten(output_tangents), is_float)
            if f]

  # tf.map_fn keeps the graph size independent of k (one loop body).
  batched = iter(tf.map_fn(
      one_direction,
      (tf.range(num_directions), [tangents[i] for i in explicit]),
      fn_output_signature=[
          tf.TensorSpec(o.shape, o.dtype)
          for o, f in zip(tf.nest.flatten(outputs), is_float) if f
      ],
  ))
  output_tangents = tf.nest.map_structure(
      lambda o: next(batched) if _is_float(o) else structural_zero(
          num_directions),
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
    fn: A TensorFlow function of `len(primals)` positional arguments, or a
      `LocalFunction` with its own reverse rule.
    primals: The arguments (nested structures of tensors).
    active: Which arguments get a cotangent.
    output_cotangent: A structure matching `fn`'s output.

  Returns:
    `(outputs, input_cotangents)`, with `None` for inactive arguments
    (`outputs` is None when `fn` brings its own reverse rule).
  """
  primals = [_as_tensors(p) for p in primals]
  if has_rule(fn, 'reverse'):
    return None, list(fn.vjp_rule(primals, list(active), output_cotangent))
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    watched = []
    for primal, is_active in zip(primals, active):
      if is_active:
        for leaf in tf.nest.flatten(primal):
          if _is_float(leaf):
            tape.watch(leaf)
            watched.append(leaf)
    outputs = _as_tensors(fn(*primals))
  warn_on_zero_derivative_ops(
      fn, watched, [o for o in tf.nest.flatten(outputs) if _is_float(o)])
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
