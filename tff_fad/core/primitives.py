"""Differentiable federated primitives and their derivative rules.

Each primitive is one class holding, side by side, its type rule, its primal
emission, its JVP rule and its transpose (VJP) rule. Every rule emits only
TFF's existing intrinsics, so a derivative program is again a federated
program built from the same primitives (the closure property of Federated
AD) and runs on TFF's runtime unchanged.

  primitive       JVP (forward)                   transpose (reverse)
  --------------  ------------------------------  ---------------------------------
  broadcast       broadcast <x, dx>               sum of client cotangents
  sum             sum <x, dx>                     broadcast of the cotangent
  mean            mean <x, dx>                    broadcast of cotangent / n
  weighted mean   sum <wx, w dx + dw x, w, dw>,   broadcast <ct / W, mean>; client i:
                  d mean = (B - mean dW) / W      ct_x = w_i ct / W,
                                                  ct_w = <ct, x_i - mean> / W
  map / apply     local ForwardAccumulator        local GradientTape, at the same
                                                  placement
  min, max,       no rule: NotDifferentiableError at transform time
  aggregate

Forward mode packs each value with its tangent into one struct, so a JVP
sends the same number of messages as the primal. Reverse mode's forward sweep
aggregates `<x, 1>` (or `<w x, w>`) in one message to keep the denominator the
transpose needs.
"""

import inspect
import weakref
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad.core import errors
from tff_fad.core import ir
from tff_fad.core import local_ad
from tff_fad.core import types as fad_types


# ---------------------------------------------------------------------------
# Emission helpers. A rule emits through these, never through `tff.federated_*`
# directly: given `ir.Value`s (a derivative program being traced) they record
# tff_fad primitives, so the derivative is again a tff_fad program that every
# transform accepts (second order); given TFF values (a program being emitted
# to TFF) they emit TFF's own intrinsics.


def _is_traced(values: Sequence[Any]) -> bool:
  return any(isinstance(v, ir.Value) for v in tf.nest.flatten(values))


def local_call(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
  """Runs a TF function on federated values where they are placed.

  Emits one `federated_map` (clients) or `federated_apply` (server); several
  arguments are zipped first, as TFF does.

  Args:
    fn: A TF function taking `len(args)` positional structures.
    args: Federated values (TFF's or tff_fad's), all at one placement.

  Returns:
    The federated result, at the arguments' placement.
  """
  if _is_traced(args):
    primitive = MAP if args[0].placement is tff.CLIENTS else APPLY
    return bind(primitive, list(args), fn=fn)
  comp = _LocalFunction.computation(fn, [a.type_signature.member for a in args])
  arg = args[0] if len(args) == 1 else tff.federated_zip(tuple(args))
  # tff.federated_map emits federated_apply for server-placed arguments.
  return tff.federated_map(comp, arg)


def emit_broadcast(value: Any) -> Any:
  if _is_traced([value]):
    return bind(BROADCAST, [value])
  return tff.federated_broadcast(value)


def emit_sum(value: Any) -> Any:
  if _is_traced([value]):
    return bind(SUM, [value])
  return tff.federated_sum(value)


def emit_mean(value: Any, weight: Any = None) -> Any:
  if _is_traced([value]):
    if weight is None:
      return bind(MEAN, [value])
    return bind(WEIGHTED_MEAN, [value, weight])
  return tff.federated_mean(value, weight=weight)


def emit_zip(structure: Any) -> Any:
  """`tff.federated_zip` of a (one-level) tuple or dict of federated values."""
  leaves = tf.nest.flatten(structure)
  if _is_traced(leaves):
    return bind(ZIP, leaves, structure=structure)
  return tff.federated_zip(structure)


def emit_tff(name: str, fn: Callable[..., Any], args: Sequence[Any]) -> Any:
  """`fn(*args)`, a TFF-level emission with no tff_fad rule (e.g. a
  `tff.aggregators` process or a secure sum): recorded as an opaque node
  (no derivative: a transform through it fails naming `name`)."""
  if _is_traced(args):
    return bind(Opaque(fn, name), list(args))
  return fn(*args)


def apply(primitive: 'Primitive', inputs: Sequence[Any],
          type_signature: Optional[tff.FederatedType] = None, **params) -> Any:
  """`primitive(*inputs)` without derivatives: re-recorded when tracing a
  derivative program, else emitted to TFF."""
  if _is_traced(inputs):
    if type_signature is None:
      type_signature = primitive.infer(list(inputs), **params)
    return ir.bind(primitive, list(inputs), type_signature, **params)
  return primitive.primal(list(inputs), **params)


def add_all(values: Sequence[Any]) -> Any:
  """Sums cotangent contributions (same placement) with one local call."""
  if len(values) == 1:
    return values[0]
  return local_call(
      lambda *xs: tf.nest.map_structure(lambda *ls: tf.add_n(ls), *xs),
      values,
  )


def zero_tangent(value: Any, num_directions: Optional[int]) -> Any:
  """A zero tangent for a federated value, computed where it lives."""
  return local_call(
      lambda x: local_ad.zeros_like_tangent(x, num_directions), [value]
  )


class Dual:
  """A federated value with its tangent, as a pair or packed in one struct.

  Communication rules ask for `packed()` so a value and its tangent travel in
  one message; local rules ask for whichever form they consume. Conversions
  are emitted lazily and at most once.
  """

  def __init__(self, primal=None, tangent=None, packed=None):
    self._primal = primal
    self._tangent = tangent
    self._packed = packed

  def packed(self):
    if self._packed is None:
      # Through the accessors: a subclass may hold its value and tangent in
      # another form (a SeededDual holds <value, seed>).
      self._packed = emit_zip((self.primal(), self.tangent()))
    return self._packed

  def primal(self):
    if self._primal is None:
      self._primal = self._packed[0]
    return self._primal

  def tangent(self):
    if self._tangent is None:
      self._tangent = self._packed[1]
    return self._tangent

  def broadcast(self) -> 'Dual':
    """The dual at the clients: value and tangent in one message."""
    return Dual(packed=emit_broadcast(self.packed()))


class SeededDual(Dual):
  """A value whose k tangents are standard normal directions from a seed.

  Until a rule needs the tangents themselves (`tangent()`/`packed()`), only
  the value and the int64 `[2]` seed travel: a broadcast sends
  `<value, seed>`, and local functions regenerate one direction at a time
  (`local_ad.SeededTangent`). So a seeded jvp's downlink carries a seed, not
  k model-sized tangents.
  """

  def __init__(self, pair, specs, position, num_directions):
    super().__init__()
    self.pair = pair  # <value, seed>, at the value's placement.
    self.specs = specs
    self.position = position
    self.num_directions = num_directions

  def primal(self):
    if self._primal is None:
      self._primal = self.pair[0]
    return self._primal

  def tangent(self):
    if self._tangent is None:
      specs, position, k = self.specs, self.position, self.num_directions
      self._tangent = local_call(
          lambda pair: local_ad.pack_ordered(pair[0], local_ad.ordered_leaves(
              local_ad.seeded_tangents(pair[1], specs, k)[position])),
          [self.pair])
    return self._tangent

  def local_tangent(self, pair) -> local_ad.SeededTangent:
    """Inside a local function: the tangent of the `<value, seed>` pair."""
    return _SeededTangentLike(pair[1], self.specs, self.position, pair[0])

  def broadcast(self) -> 'Dual':
    if self._tangent is not None:  # Already materialized: send it.
      return super().broadcast()
    # The seed travels, not the tangents.
    return SeededDual(emit_broadcast(self.pair), self.specs, self.position,
                      self.num_directions)


class _SeededTangentLike(local_ad.SeededTangent):
  """A seeded tangent packed in its value's containers (e.g. OrderedDict)."""

  def __init__(self, seed, specs, position, like):
    super().__init__(seed, specs, position)
    self.like = like

  def direction(self, index):
    return local_ad.pack_ordered(
        self.like, local_ad.ordered_leaves(super().direction(index)))

  def stacked(self, num_directions):
    return local_ad.pack_ordered(
        self.like, local_ad.ordered_leaves(super().stacked(num_directions)))


def _is_seeded(x) -> bool:
  return isinstance(x, SeededDual) and x._tangent is None  # pylint: disable=protected-access


def primal_of(x):
  return x.primal() if isinstance(x, Dual) else x


def _outer(direction_scalars: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
  """`s * x`, or with `k` directions `[s_1 x, ..., s_k x]` stacked on axis 0."""
  s = tf.cast(direction_scalars, x.dtype)
  if s.shape.rank == 0:
    return s * x
  return tf.reshape(s, [-1] + [1] * x.shape.rank) * x[tf.newaxis]


def _tree_vdot(a, b) -> tf.Tensor:
  """Sum over all leaves of elementwise products (float leaves only)."""
  terms = [
      tf.reduce_sum(x * tf.cast(y, x.dtype))
      for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))
      if x.dtype.is_floating
  ]
  return tf.add_n(terms) if terms else tf.constant(0.0)


# ---------------------------------------------------------------------------
# The rule table.


class Primitive:
  """A federated primitive with its derivative rules.

  Subclasses implement `infer` (trace time), `primal` and, if differentiable,
  `jvp` and `transpose`. `forward_with_residuals` is the primal used in
  reverse mode's forward sweep; it may also return values the transpose needs.
  """

  name: str = 'primitive'
  differentiable: bool = True

  def infer(self, inputs: Sequence[ir.Value], **params) -> tff.FederatedType:
    raise NotImplementedError

  def primal(self, inputs: List[Any], **params) -> Any:
    raise NotImplementedError

  def jvp(self, inputs: List[Any], active: List[bool], num_directions,
          **params) -> Dual:
    raise NotImplementedError

  def forward_with_residuals(self, inputs: List[Any], active: List[bool],
                             **params):
    return apply(self, inputs, **params), None

  def transpose(self, cotangent: Any, inputs: Callable[[], List[Any]],
                residuals: Any, active: List[bool], **params
                ) -> List[Optional[Any]]:
    raise NotImplementedError

  def undefined_derivative(self, residuals: Any) -> Optional[Any]:
    """A server scalar, NaN where this node's transpose is undefined and 0
    elsewhere (e.g. a mean over no clients), or None."""
    del residuals
    return None

  # False for primitives whose output is constant w.r.t. every input.
  propagates_derivatives: bool = True

  def why_not_differentiable(self, node: ir.Node, mode: str) -> str:
    """Why `node` cannot be differentiated in `mode`, or '' if it can."""
    return ''


def require_placement(primitive: str, argument: str, value: Any, placement):
  """Raises a PlacementError naming `argument` unless `value` is placed so."""
  if not isinstance(value, ir.Value):
    raise errors.FederatedADError(
        f'tff_fad.{primitive}: argument {argument!r} must be a tff_fad '
        f'federated value, found {value!r}.'
    )
  if value.placement is not placement:
    raise errors.PlacementError(
        f'tff_fad.{primitive}: argument {argument!r} must be placed at '
        f'{placement}, but {value.name} has type {value.type_signature}.'
    )


class Broadcast(Primitive):
  """T@SERVER -> T@CLIENTS."""

  name = 'federated_broadcast'

  def infer(self, inputs):
    x = inputs[0]  # A private broadcast also reads aggregator states.
    require_placement(self.name, 'value', x, tff.SERVER)
    return tff.FederatedType(x.member, tff.CLIENTS, all_equal=True)

  def primal(self, inputs):
    return tff.federated_broadcast(inputs[0])

  def jvp(self, inputs, active, num_directions):
    return inputs[0].broadcast()

  def transpose(self, cotangent, inputs, residuals, active):
    return [emit_sum(cotangent)]


class Sum(Primitive):
  """{T}@CLIENTS -> T@SERVER."""

  name = 'federated_sum'

  def infer(self, inputs):
    (x,) = inputs
    require_placement(self.name, 'value', x, tff.CLIENTS)
    return tff.FederatedType(x.member, tff.SERVER)

  def primal(self, inputs):
    return tff.federated_sum(inputs[0])

  def jvp(self, inputs, active, num_directions):
    return Dual(packed=emit_sum(inputs[0].packed()))

  def transpose(self, cotangent, inputs, residuals, active):
    return [emit_broadcast(cotangent)]


def _divide(tree, denominator):
  return tf.nest.map_structure(
      lambda t: t / tf.cast(denominator, t.dtype), tree
  )


class Mean(Primitive):
  """{T}@CLIENTS -> T@SERVER, the unweighted mean over clients."""

  name = 'federated_mean'

  def infer(self, inputs):
    (x,) = inputs
    require_placement(self.name, 'value', x, tff.CLIENTS)
    if fad_types.non_float_leaves(x.member):
      raise errors.FederatedADError(
          f'tff_fad.federated_mean needs floating-point values; {x.name} has '
          f'type {x.type_signature}.'
      )
    return tff.FederatedType(x.member, tff.SERVER)

  def primal(self, inputs):
    return tff.federated_mean(inputs[0])

  def jvp(self, inputs, active, num_directions):
    return Dual(packed=emit_mean(inputs[0].packed()))

  def forward_with_residuals(self, inputs, active):
    # One message carries the value and a 1, so the server learns n.
    totals = emit_sum(
        local_call(lambda x: (x, tf.constant(1.0, tf.float32)), inputs)
    )
    count = totals[1]
    return local_call(lambda t: _divide(t[0], t[1]), [totals]), count

  def undefined_derivative(self, count):
    return local_call(_nan_if_zero, [count])

  def transpose(self, cotangent, inputs, count, active):
    scaled = local_call(_divide, [cotangent, count])
    return [emit_broadcast(scaled)]


def _nan_if_zero(denominator: tf.Tensor) -> tf.Tensor:
  """NaN where a mean's denominator is 0 (its value is 0/0), else 0."""
  return tf.where(tf.equal(denominator, 0),
                  tf.constant(np.nan, denominator.dtype),
                  tf.zeros([], denominator.dtype))


def _as_weight(w: tf.Tensor) -> tf.Tensor:
  """Float weights keep their dtype (float64 stays exact); integer counts
  become float32, as in TFF's weighted mean."""
  return w if w.dtype.is_floating else tf.cast(w, tf.float32)


class WeightedMean(Primitive):
  """({T}@CLIENTS, {float32}@CLIENTS) -> T@SERVER: sum(w x) / sum(w)."""

  name = 'federated_mean(weight=...)'

  def infer(self, inputs):
    x, w = inputs
    require_placement('federated_mean', 'value', x, tff.CLIENTS)
    require_placement('federated_mean', 'weight', w, tff.CLIENTS)
    if fad_types.non_float_leaves(x.member):
      raise errors.FederatedADError(
          f'tff_fad.federated_mean needs floating-point values; {x.name} has '
          f'type {x.type_signature}.'
      )
    if not (isinstance(w.member, tff.TensorType) and not w.member.shape):
      raise errors.FederatedADError(
          'tff_fad.federated_mean: weight must be a scalar per client, found '
          f'{w.type_signature}.'
      )
    return tff.FederatedType(x.member, tff.SERVER)

  def primal(self, inputs):
    return tff.federated_mean(inputs[0], weight=inputs[1])

  def jvp(self, inputs, active, num_directions):
    x, w = inputs
    x_active, w_active = active
    if not w_active:
      return Dual(packed=emit_mean(x.packed(), weight=w))
    k = num_directions

    def client_terms(x_dual, w_dual):
      # x_dual is (x, dx) or x alone; w_dual is (w, dw).
      if x_active:
        xv, dx = x_dual
      else:
        xv, dx = x_dual, local_ad.zeros_like_tangent(x_dual, k)
      wv, dw = w_dual
      wv = _as_weight(wv)

      wx = tf.nest.map_structure(lambda a: tf.cast(wv, a.dtype) * a, xv)
      tangent = tf.nest.map_structure(
          lambda a, da: tf.cast(wv, a.dtype) * da + _outer(dw, a), xv, dx
      )
      return wx, tangent, wv, tf.cast(dw, wv.dtype)

    x_in = x.packed() if x_active else x
    totals = emit_sum(local_call(client_terms, [x_in, w.packed()]))

    def finish(t):
      sum_wx, sum_tangent, sum_w, sum_dw = t
      mean = _divide(sum_wx, sum_w)

      def leaf_tangent(m, b):
        return (b - _outer(sum_dw, m)) / tf.cast(sum_w, m.dtype)

      return mean, tf.nest.map_structure(leaf_tangent, mean, sum_tangent)

    return Dual(packed=local_call(finish, [totals]))

  def forward_with_residuals(self, inputs, active):
    def client_terms(xv, wv):
      wv = _as_weight(wv)
      return tf.nest.map_structure(lambda a: tf.cast(wv, a.dtype) * a, xv), wv

    totals = emit_sum(local_call(client_terms, inputs))
    mean = local_call(lambda t: _divide(t[0], t[1]), [totals])
    total_weight = totals[1]
    return mean, (mean, total_weight)

  def undefined_derivative(self, residuals):
    return local_call(_nan_if_zero, [residuals[1]])

  def transpose(self, cotangent, inputs, residuals, active):
    mean, total_weight = residuals
    x_active, w_active = active
    message = local_call(
        lambda ct, m, tw: (_divide(ct, tw), m),
        [cotangent, mean, total_weight],
    )
    at_clients = emit_broadcast(message)

    def client_cotangents(msg, xv, wv):
      ct_over_w, m = msg
      wv = _as_weight(wv)
      ct_x = tf.nest.map_structure(
          lambda c: tf.cast(wv, c.dtype) * c, ct_over_w
      )
      diff = tf.nest.map_structure(lambda a, b: a - b, xv, m)
      ct_w = tf.cast(_tree_vdot(ct_over_w, diff), wv.dtype)
      return ct_x, ct_w

    cts = local_call(client_cotangents, [at_clients] + list(inputs()))
    return [cts[0] if x_active else None, cts[1] if w_active else None]


def _callable_name(fn) -> str:
  return getattr(fn, '__name__', type(fn).__name__)


def _keep_positions(structure, positions, num_directions):
  """A tuple or list `structure` with its members outside `positions`
  replaced by structural zeros (same containers, nothing model-sized)."""
  zero = lambda x: local_ad.structural_zero(num_directions)  # pylint: disable=unnecessary-lambda-assignment
  return type(structure)(
      v if i in positions else tf.nest.map_structure(zero, v)
      for i, v in enumerate(structure))


class _LocalFunction(Primitive):
  """Shared rules of `federated_map` (clients) and `federated_apply` (server)."""

  placement = None
  # fn -> {argument member types: its tff.tensorflow.computation}. Type
  # inference traces a function once; emission reuses that trace.
  _computations = weakref.WeakKeyDictionary()

  def infer(self, inputs, fn):
    for i, x in enumerate(inputs):
      require_placement(self.name, f'arg[{i}]', x, self.placement)
    comp = self.computation(fn, [x.member for x in inputs])
    return tff.FederatedType(comp.type_signature.result, self.placement)

  @classmethod
  def computation(cls, fn, member_types) -> tff.Computation:
    """`fn` as a TF computation of `member_types` (zipped if several)."""
    if isinstance(fn, tff.Computation):
      return fn
    key = tuple(member_types)
    try:
      cached = cls._computations.setdefault(fn, {})
    except TypeError:  # Not weak-referenceable: trace every time.
      cached = {}
    if key not in cached:
      if len(member_types) == 1:
        comp = tff.tensorflow.computation(lambda x: fn(x), member_types[0])  # pylint: disable=unnecessary-lambda
      else:
        comp = tff.tensorflow.computation(
            lambda xs: fn(*xs), tff.StructWithPythonType(member_types, tuple))
      cached[key] = comp
    return cached[key]

  def primal(self, inputs, fn):
    comp = self.computation(fn, [x.type_signature.member for x in inputs])
    arg = inputs[0] if len(inputs) == 1 else tff.federated_zip(tuple(inputs))
    return tff.federated_map(comp, arg)

  def why_not_differentiable(self, node, mode):
    fn = node.params['fn']
    if isinstance(fn, tff.Computation):
      return (
          f'{self.name} was given an already-compiled tff.Computation '
          f'({fn.type_signature}); pass the Python TF function instead so '
          'tff_fad can differentiate it.'
      )
    if local_ad.has_rule(fn, mode):
      return ''
    for i, x in enumerate(node.inputs):
      if isinstance(x.member, tff.SequenceType):
        return (
            f'{self.name}({_callable_name(fn)}) takes a tf.data.Dataset '
            f'(arg[{i}]: {x.type_signature}); derivatives cannot flow '
            'through dataset iteration: pass differentiable client data as '
            'tensors, or give the function its own per-batch rules with '
            'tff_fad.with_derivatives.'
        )
    return ''

  def jvp(self, inputs, active, num_directions, fn, needed_positions=None):
    """`needed_positions`: compute only these members' tangents of a struct
    output (the others are structural zeros, never read: see
    `transforms.prune_tangents`)."""
    seeded = [on and _is_seeded(x) for x, on in zip(inputs, active)]

    def local_jvp(*args):
      primals = [a[0] if on else a for a, on in zip(args, active)]
      tangents = [
          x.local_tangent(a) if s else (a[1] if on else None)
          for a, x, on, s in zip(args, inputs, active, seeded)]
      outputs, output_tangents = local_ad.jvp(fn, primals, tangents,
                                              num_directions)
      if needed_positions is not None:
        output_tangents = _keep_positions(output_tangents, needed_positions,
                                          num_directions)
      return outputs, output_tangents

    args = [x.pair if s else (x.packed() if on else x)
            for x, on, s in zip(inputs, active, seeded)]
    return Dual(packed=local_call(local_jvp, args))

  def transpose(self, cotangent, inputs, residuals, active, fn):
    def local_vjp(*args):
      *primals, ct = args
      _, cts = local_ad.vjp(fn, primals, active, ct)
      return tuple(c for c in cts if c is not None)

    result = local_call(local_vjp, list(inputs()) + [cotangent])
    selected = iter(range(sum(active)))
    return [result[next(selected)] if on else None for on in active]


class Map(_LocalFunction):
  name = 'federated_map'
  placement = tff.CLIENTS


class Apply(_LocalFunction):
  name = 'federated_apply'
  placement = tff.SERVER


class _Structural(_LocalFunction):
  """A local function TFF emits without a TF computation (zip, select).

  Its derivative rules are those of the equivalent `federated_map` /
  `federated_apply` (`local_function`), so derivative programs, which use
  these to pack values with tangents, can be differentiated again.
  """

  def local_function(self, **params) -> Callable[..., Any]:
    raise NotImplementedError

  def _check_placement(self, inputs):
    placement = inputs[0].placement
    for i, x in enumerate(inputs):
      require_placement(self.name, f'arg[{i}]', x, placement)
    return placement

  def why_not_differentiable(self, node, mode):
    return ''

  def jvp(self, inputs, active, num_directions, **params):
    return super().jvp(inputs, active, num_directions,
                       fn=self.local_function(**params))

  def transpose(self, cotangent, inputs, residuals, active, **params):
    return super().transpose(cotangent, inputs, residuals, active,
                             fn=self.local_function(**params))


class Zip(_Structural):
  """(T1@P, ..., Tn@P) -> <T1, ..., Tn>@P, as `tff.federated_zip`."""

  name = 'federated_zip'

  def local_function(self, structure):
    return lambda *xs: tf.nest.pack_sequence_as(structure, list(xs))

  def infer(self, inputs, structure):
    self._check_placement(inputs)
    arg_type = tff.StructType([x.type_signature for x in inputs])
    probe = tff.federated_computation(
        lambda arg: tff.federated_zip(tf.nest.pack_sequence_as(
            structure, [arg[i] for i in range(len(inputs))])),
        arg_type)
    return probe.type_signature.result

  def primal(self, inputs, structure):
    return tff.federated_zip(tf.nest.pack_sequence_as(structure, inputs))

  def jvp(self, inputs, active, num_directions, structure):
    if not all(active) or any(_is_seeded(x) for x in inputs):
      return super().jvp(inputs, active, num_directions, structure=structure)
    # Zipped values and zipped tangents: no TF computation per client.
    return Dual(
        primal=apply(self, [x.primal() for x in inputs], structure=structure),
        tangent=apply(self, [x.tangent() for x in inputs],
                      structure=structure))


class Select(_Structural):
  """`<..., key=T, ...>@P -> T@P`, TFF's own selection of a member."""

  name = 'select'

  def local_function(self, key):
    selector = lambda x: _index(x, key)  # pylint: disable=unnecessary-lambda-assignment
    selector.__name__ = f'select[{key!r}]'
    return selector

  def infer(self, inputs, key):
    placement = self._check_placement(inputs)
    member = inputs[0].member
    element = getattr(member, key) if isinstance(key, str) else member[key]
    return tff.FederatedType(element, placement)

  def primal(self, inputs, key):
    return inputs[0][key]

  def jvp(self, inputs, active, num_directions, key):
    (x,) = inputs
    if _is_seeded(x):
      return super().jvp(inputs, active, num_directions, key=key)
    # The tangent mirrors the value's structure: select from both, with no
    # TF computation per client.
    return Dual(primal=apply(self, [x.primal()], key=key),
                tangent=apply(self, [x.tangent()], key=key))

  def forward_with_residuals(self, inputs, active, key):
    # The transpose needs the input's type, not its value: reading the value
    # would make clients keep it between the sweeps, or compute it again
    # (in 'reverse_recompute', and in each stage on workers), e.g. a whole
    # local training whose loss alone is differentiated.
    return apply(self, inputs, key=key), inputs[0].type_signature.member

  def transpose(self, cotangent, inputs, residuals, active, key):
    zeros_type = fad_types.tangent_type(residuals)
    container = getattr(zeros_type, 'python_container', None)
    if hasattr(container, '__attrs_attrs__') or not all(
        tff.types.is_shape_fully_defined(t.shape)
        for t in fad_types.tensor_leaves(zeros_type)):
      # Zeros need static shapes; attrs classes are not rebuilt here.
      return super().transpose(cotangent, inputs, residuals, active, key=key)

    def scatter(ct):
      zeros = tff.types.structure_from_tensor_type_tree(
          lambda t: tf.zeros(t.shape, t.dtype), zeros_type)
      return _with_member(zeros, key, ct)

    scatter.__name__ = f'transpose_select[{key!r}]'
    return [local_call(scatter, [cotangent])]


class StopGradient(Primitive):
  """Identity on values; derivatives do not flow through it."""

  name = 'stop_gradient'
  propagates_derivatives = False

  def infer(self, inputs):
    (x,) = inputs
    if not isinstance(x, ir.Value):
      raise errors.FederatedADError(
          f'tff_fad.stop_gradient needs a tff_fad federated value, found '
          f'{x!r}.')
    return x.type_signature

  def primal(self, inputs):
    return inputs[0]  # Emits nothing.


class Opaque(Primitive):
  """A TFF intrinsic with no derivative rule (min, max, aggregate, ...)."""

  differentiable = False

  def __init__(self, intrinsic: Callable[..., Any], name: str):
    self.intrinsic = intrinsic
    self.name = name

  def infer(self, inputs, **kwargs):
    arg_type = tff.StructType([x.type_signature for x in inputs])
    probe = tff.federated_computation(
        lambda arg: self.intrinsic(
            *[arg[i] for i in range(len(inputs))], **kwargs
        ),
        arg_type,
    )
    return probe.type_signature.result

  def primal(self, inputs, **kwargs):
    return self.intrinsic(*inputs, **kwargs)

  def why_not_differentiable(self, node, mode):
    del mode  # No rule in any mode.
    args = ', '.join(f'{x.name}: {x.type_signature}' for x in node.inputs)
    return (
        f'{self.name} has no derivative rule, and its argument(s) ({args}) '
        'depend on the differentiated inputs. Restructure the program so '
        f'{self.name} only sees values that are constant w.r.t. `wrt`.'
    )


BROADCAST = Broadcast()
SUM = Sum()
MEAN = Mean()
WEIGHTED_MEAN = WeightedMean()
MAP = Map()
APPLY = Apply()
ZIP = Zip()
SELECT = Select()
STOP_GRADIENT = StopGradient()
MIN = Opaque(tff.federated_min, 'federated_min')
MAX = Opaque(tff.federated_max, 'federated_max')
AGGREGATE = Opaque(tff.federated_aggregate, 'federated_aggregate')

# Intrinsics a derivative program may contain, per primitive. Tests use this
# to check closure; federated_zip is structural (no communication).
ALLOWED_INTRINSICS = frozenset({
    'federated_broadcast', 'federated_map', 'federated_apply',
    'federated_sum', 'federated_mean', 'federated_weighted_mean',
    'federated_zip_at_clients', 'federated_zip_at_server',
})


# ---------------------------------------------------------------------------
# The public primitives.


def bind(primitive: Primitive, inputs: Sequence[ir.Value], **params):
  """Type-checks and records `primitive(*inputs, **params)` in the trace.

  The one way to apply a primitive: new primitives (e.g. in
  `tff_fad.aggregation`) define a `Primitive` subclass and call this.
  """
  ir.current_program(primitive.name)  # Fails clearly outside a trace.
  return ir.bind(primitive, inputs, primitive.infer(inputs, **params),
                 **params)


def federated_broadcast(value: ir.Value) -> ir.Value:
  """Broadcasts `value`: T@SERVER -> T@CLIENTS. Derivative: a sum."""
  return bind(BROADCAST, [value])


def federated_sum(value: ir.Value) -> ir.Value:
  """Sums `value` over clients: {T}@CLIENTS -> T@SERVER. Derivative: broadcast."""
  return bind(SUM, [value])


def federated_mean(value: ir.Value, weight: Optional[ir.Value] = None
                   ) -> ir.Value:
  """Mean over clients, optionally weighted: {T}@CLIENTS -> T@SERVER.

  Args:
    value: Floating-point values at clients.
    weight: Optional scalar weight per client ({float32}@CLIENTS or
      integer); differentiable when it is floating point.

  Returns:
    `sum_i w_i x_i / sum_i w_i` at the server (`w_i = 1` without weights).
  """
  if weight is None:
    return bind(MEAN, [value])
  return bind(WEIGHTED_MEAN, [value, weight])


def _as_inputs(primitive: str, arg: Any) -> List[ir.Value]:
  if isinstance(arg, ir.Value):
    return [arg]
  if isinstance(arg, (tuple, list)) and arg:
    return list(arg)
  raise errors.FederatedADError(
      f'tff_fad.{primitive}: arg must be a federated value or a non-empty '
      f'tuple of them, found {arg!r}.'
  )


def _check_callable(primitive: str, fn: Any, n: int):
  if not callable(fn):
    raise errors.FederatedADError(
        f'tff_fad.{primitive}: fn must be callable, found {fn!r}.'
    )
  if isinstance(fn, tff.Computation):
    return
  try:
    inspect.signature(fn).bind(*range(n))
  except TypeError as e:
    raise errors.FederatedADError(
        f'tff_fad.{primitive}: {_callable_name(fn)} cannot take the {n} '
        f'positional argument(s) it would receive ({e}).'
    ) from e
  except ValueError:
    pass  # Builtins without a signature: let TF report misuse.


def federated_map(fn: Callable[..., Any], arg: Any) -> ir.Value:
  """Applies a TF function at each client: {T}@CLIENTS -> {U}@CLIENTS.

  Args:
    fn: A Python function of TF tensors (not a tff.Computation, if you want
      derivatives). A tuple `arg` is zipped and unpacked into `fn`'s
      positional parameters, as TFF does.
    arg: A client-placed value, or a tuple of them.

  Returns:
    The client-placed result.
  """
  inputs = _as_inputs('federated_map', arg)
  _check_callable('federated_map', fn, len(inputs))
  return bind(MAP, inputs, fn=fn)


def federated_apply(fn: Callable[..., Any], arg: Any) -> ir.Value:
  """Applies a TF function at the server: T@SERVER -> U@SERVER.

  Args:
    fn: A Python function of TF tensors; a tuple `arg` is unpacked into its
      positional parameters.
    arg: A server-placed value, or a tuple of them.

  Returns:
    The server-placed result.
  """
  inputs = _as_inputs('federated_apply', arg)
  _check_callable('federated_apply', fn, len(inputs))
  return bind(APPLY, inputs, fn=fn)


def stop_gradient(value: ir.Value) -> ir.Value:
  """`value`, treated as a constant by every derivative transform.

  E.g. local training that starts from a broadcast model whose derivative is
  not wanted (and may be impossible: training iterates a dataset).
  """
  return bind(STOP_GRADIENT, [value])


def federated_min(value: ir.Value) -> ir.Value:
  """tff.federated_min; runs in the primal, has no derivative rule."""
  return bind(MIN, [value])


def federated_max(value: ir.Value) -> ir.Value:
  """tff.federated_max; runs in the primal, has no derivative rule."""
  return bind(MAX, [value])


def federated_aggregate(value: ir.Value, zero, accumulate, merge, report
                        ) -> ir.Value:
  """tff.federated_aggregate; runs in the primal, has no derivative rule."""
  return bind(AGGREGATE, [value], zero=zero, accumulate=accumulate,
               merge=merge, report=report)


def select(value: ir.Value, key) -> ir.Value:
  """`value[key]` for a structured federated value, at its placement."""
  if not isinstance(value.member, tff.StructType):
    raise errors.FederatedADError(
        f'{value.name} has type {value.type_signature}; only structures can '
        'be indexed.'
    )
  if isinstance(key, bool) or not isinstance(key, (int, str)):
    raise errors.FederatedADError(
        f'Cannot index {value.name} with {key!r}: use an int or a str.'
    )
  names = [n for n, _ in tff.structure.iter_elements(value.member)]
  if isinstance(key, str) and key not in names:
    raise errors.FederatedADError(
        f'{value.name} ({value.type_signature}) has no member {key!r}; its '
        f'names are {[n for n in names if n]}.')
  if isinstance(key, int) and not -len(names) <= key < len(names):
    raise errors.FederatedADError(
        f'Index {key} is out of range for {value.name} '
        f'({value.type_signature}), which has {len(names)} member(s).')
  if isinstance(key, int):
    key %= len(names)
  return bind(SELECT, [value], key=key)


ir.set_indexing(select)


def _with_member(structure, key, value):
  """`structure` (a dict, namedtuple, tuple or list) with its member `key`
  (a name or a position) set to `value`."""
  if isinstance(structure, dict):
    name = key if isinstance(key, str) else list(structure)[key]
    updated = type(structure)(list(structure.items()))
    updated[name] = value
    return updated
  if hasattr(structure, '_fields'):  # A namedtuple.
    name = key if isinstance(key, str) else structure._fields[key]
    return structure._replace(**{name: value})
  items = list(structure)
  items[key] = value
  return type(structure)(items)


def _index(structure, key):
  if isinstance(key, str):
    if isinstance(structure, dict):
      return structure[key]
    return getattr(structure, key)
  if isinstance(structure, dict):
    return list(structure.values())[key]
  return structure[key]
