"""A differentiable secure sum of floating-point client values.

TFF's secure sums (`tff.federated_secure_sum_bitwidth`) take integers, so
`federated_secure_sum` clips each client's floats to a declared range,
quantizes them to integers, sums the integers securely and de-quantizes at
the server, as `tff.aggregators.SecureSumFactory` does. The derivatives take
the same secure path:

  pass                   what is summed securely          clipping range
  ---------------------  -------------------------------  -------------------
  primal                 <x, 1, #clipped>                 clip_range
  forward (JVP)          <x, dx * in_range(x), 1, ...>    clip_range,
                         in ONE secure sum                tangent_clip_range
  reverse, forward sweep as the primal                    clip_range
  reverse, backward      the cotangent sums of the        cotangent_clip_range
                         broadcasts feeding `x`
                         (see `cotangent_sums`)

The transpose of a sum is a broadcast (server to clients: no client data);
the cotangent of client `i` is `ct * in_range(x_i)`, the derivative of the
clipping. Quantization is treated as the identity (its derivative is zero
almost everywhere, which would be useless); the derivative is that of the
clipped, unquantized sum, within the error bound below.

Quantization and its error bound. With range [L, U], `b` bits per value and
`M = 2**b - 1` levels, client `i` sends `q_i = round((clip(x_i) - L) / s)`
with step `s = (U - L) / M`, and the server returns `L n + s sum_i q_i`. Each
client's rounding error is at most `s / 2`, so for `n` clients

  |result - sum_i clip(x_i)| <= n (U - L) / (2 (2**b - 1))   per element,

plus float32 rounding of the result (relative 2**-24). The integer sum is at
most `n_max M`, so the secure sum's bit width is the bit length of
`n_max M`; configurations needing more than 62 bits are refused with a
ValueError. The number of clients is summed in the same secure sum (the
de-quantization needs it) and checked against `num_clients_bound` at the
server: a run with more clients fails instead of returning a wrapped sum.

Runtime. TFF's default C++ execution context cannot run the secure
intrinsics (it fails with an `_InactiveRpcError`, "Cannot embed a federated
value"). TFF's test context simulates them: run programs with secure sums in
`with tff_fad.aggregation.secure_simulation_context(): ...`.
"""

import collections
import contextlib
import dataclasses
import math
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad.aggregation import cotangent_sums
from tff_fad.core import errors
from tff_fad.core import ir
from tff_fad.core import local_ad
from tff_fad.core import primitives
from tff_fad.core import types as fad_types

# int64 secure sums; two bits of headroom keep every intermediate positive.
MAX_SUM_BITWIDTH = 62
# float32 has a 24-bit significand: finer quantization adds no precision.
DEFAULT_VALUE_BITS = 24

Range = Tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """Clipping and quantization of one kind of value (value, tangent, ...).

  Attributes:
    lower: Lower end of the clipping range.
    upper: Upper end of the clipping range.
    value_bits: Bits per quantized value (`M = 2**value_bits - 1` levels).
    num_clients_bound: Largest number of clients a sum may have.
  """

  lower: float
  upper: float
  value_bits: int
  num_clients_bound: int

  @property
  def levels(self) -> int:
    return 2**self.value_bits - 1

  @property
  def step(self) -> float:
    return (self.upper - self.lower) / self.levels

  @property
  def sum_bitwidth(self) -> int:
    """Bits the secure sum needs so `num_clients_bound` values cannot wrap."""
    return (self.num_clients_bound * self.levels).bit_length()

  def error_bound(self, num_clients: int) -> float:
    """Max |secure sum - exact clipped sum| per element (before float32)."""
    return num_clients * self.step / 2

  def encode(self, x: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """`(q, clipped)`: int64 levels and how many elements were clipped.

    NaNs are mapped to `lower` and counted as clipped.
    """
    x64 = tf.cast(x, tf.float64)
    nan = tf.math.is_nan(x64)
    lower = tf.constant(self.lower, tf.float64)
    clipped = tf.clip_by_value(tf.where(nan, lower, x64), self.lower,
                               self.upper)
    n_clipped = tf.reduce_sum(tf.cast(
        tf.logical_or(nan, tf.not_equal(clipped, x64)), tf.int64))
    q = tf.cast(tf.round((clipped - self.lower) / self.step), tf.int64)
    return q, n_clipped

  def decode(self, q_sum: tf.Tensor, count: tf.Tensor, dtype) -> tf.Tensor:
    value = (self.lower * tf.cast(count, tf.float64)
             + self.step * tf.cast(q_sum, tf.float64))
    return tf.cast(value, dtype)

  def in_range(self, x: tf.Tensor) -> tf.Tensor:
    """1 where `x` is inside the range (the derivative of clipping), else 0."""
    return tf.cast(tf.logical_and(x >= self.lower, x <= self.upper), x.dtype)


def make_quantizer(argument: str, clip_range: Optional[Range],
                   bitwidth: Optional[int], num_clients_bound: int
                   ) -> Optional[Quantizer]:
  """Validates a clipping range and chooses the quantization.

  Args:
    argument: The argument's name, for error messages.
    clip_range: `(lower, upper)` or None (no quantizer).
    bitwidth: Bits per value, or None for the most that fits (at most 24).
    num_clients_bound: The largest number of clients a sum may have.

  Returns:
    A `Quantizer`, or None when `clip_range` is None.

  Raises:
    ValueError: on a malformed range, or if the sum could overflow.
  """
  if clip_range is None:
    return None
  try:
    lower, upper = (float(v) for v in clip_range)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f'{argument} must be a pair (lower, upper) of numbers, found '
        f'{clip_range!r}.') from e
  if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
    raise ValueError(
        f'{argument}=({lower}, {upper}) must be finite with lower < upper.')
  client_bits = num_clients_bound.bit_length()
  if bitwidth is None:
    bitwidth = min(DEFAULT_VALUE_BITS, MAX_SUM_BITWIDTH - client_bits)
    if bitwidth < 1:
      raise ValueError(
          f'num_clients_bound={num_clients_bound} leaves no bits for values '
          f'in a {MAX_SUM_BITWIDTH}-bit secure sum.')
  if isinstance(bitwidth, bool) or not isinstance(bitwidth, int) or (
      bitwidth < 1):
    raise ValueError(f'bitwidth must be a positive int, found {bitwidth!r}.')
  quantizer = Quantizer(lower, upper, bitwidth, num_clients_bound)
  if quantizer.sum_bitwidth > MAX_SUM_BITWIDTH:
    raise ValueError(
        f'federated_secure_sum would overflow: {num_clients_bound} clients x '
        f'{bitwidth}-bit values need a {quantizer.sum_bitwidth}-bit sum, more '
        f'than the {MAX_SUM_BITWIDTH} bits supported. Lower bitwidth to at '
        f'most {MAX_SUM_BITWIDTH - client_bits} or num_clients_bound.')
  return quantizer


def _check_count(count: tf.Tensor, bound: int) -> tf.Tensor:
  """Fails the run if more clients than `bound` took part (a wrapped sum)."""
  check = tf.debugging.assert_less_equal(
      count, tf.constant(bound, tf.int64),
      message=(f'federated_secure_sum: more clients than num_clients_bound='
               f'{bound} took part; the secure sum may have overflowed.'))
  with tf.control_dependencies([check]):
    return tf.identity(count)


@dataclasses.dataclass(frozen=True)
class SecureSumPlan:
  """The quantizers of one secure-sum point, for each pass."""

  value: Quantizer
  tangent: Optional[Quantizer]
  cotangent: Optional[Quantizer]


class _SecureCotangentSum(cotangent_sums.CotangentAggregation):
  """Sums the client cotangents of a broadcast with a secure sum."""

  def __init__(self, quantizer: Optional[Quantizer], point: str):
    self.quantizer = quantizer
    self.point = point

  def describe(self):
    q = self.quantizer
    rng = 'no cotangent_clip_range' if q is None else (
        f'cotangent_clip_range=({q.lower}, {q.upper})')
    return f'federated_secure_sum({self.point}) with {rng}'

  def missing_reason(self):
    if self.quantizer is None:
      return ('that federated_secure_sum has no cotangent_clip_range; give '
              'one so the cotangent sum can be secure too.')
    return ''

  def merge(self, other):
    if not isinstance(other, _SecureCotangentSum):
      return None
    if self.quantizer is None or other.quantizer is None:
      return self if self.quantizer is None else other
    a, b = self.quantizer, other.quantizer
    # The widest range and the coarsest quantization satisfy both points
    # (wider only clips less); recheck that the sum still cannot overflow.
    merged = make_quantizer(
        'cotangent_clip_range', (min(a.lower, b.lower), max(a.upper, b.upper)),
        min(a.value_bits, b.value_bits),
        max(a.num_clients_bound, b.num_clients_bound))
    return _SecureCotangentSum(merged, f'{self.point}, {other.point}')

  def emit(self, client_cotangents, extra_values, member_type):
    del extra_values, member_type  # Reads no server state.
    return _secure_sum_leaves(client_cotangents, [self.quantizer])[0]


def _secure_sum_leaves(value, quantizers: Sequence[Quantizer]):
  """Securely sums k structures packed in one client value `<s_1, ..., s_k>`.

  Args:
    value: `{<s_1, ..., s_k>}@CLIENTS` (or `{s_1}@CLIENTS` when k == 1).
    quantizers: One quantizer per structure.

  Returns:
    `(sums, clipped_counts)`: `<sum s_1, ..., sum s_k>@SERVER` (just
    `sum s_1` when k == 1) and `<#clipped_1, ..., #clipped_k>@SERVER`.
  """
  k = len(quantizers)
  bound = max(q.num_clients_bound for q in quantizers)

  def encode(v):
    parts = [v] if k == 1 else list(v)
    qs, clipped = [], []
    for part, quantizer in zip(parts, quantizers):
      encoded = [quantizer.encode(leaf) for leaf in tf.nest.flatten(part)]
      qs.append(tuple(q for q, _ in encoded))
      clipped.append(tf.add_n([c for _, c in encoded]))
    return tuple(qs), tf.constant(1, tf.int64), tuple(clipped)

  encoded = primitives.local_call(encode, [value])
  parts = _parts(value.type_signature.member, k)
  widths = (
      tuple(tuple(q.sum_bitwidth for _ in fad_types.tensor_leaves(part))
            for q, part in zip(quantizers, parts)),
      bound.bit_length(),
      # At most `bound` clients clip every element of their structure.
      tuple((bound * max(1, fad_types.num_elements(part))).bit_length()
            for part in parts),
  )
  sums = primitives.emit_tff(
      'federated_secure_sum_bitwidth',
      lambda e: tff.federated_secure_sum_bitwidth(e, widths), [encoded])
  templates = [_dtypes(p) for p in parts]

  def decode(s):
    q_sums, count, clipped = s
    count = _check_count(count, bound)
    results = []
    for q_sum, quantizer, template in zip(q_sums, quantizers, templates):
      leaves = [quantizer.decode(q, count, dtype)
                for q, dtype in zip(q_sum, tf.nest.flatten(template))]
      results.append(tf.nest.pack_sequence_as(template, leaves))
    result = results[0] if k == 1 else tuple(results)
    return result, clipped

  decoded = primitives.local_call(decode, [sums])
  return decoded[0], decoded[1]


def _parts(member: tff.Type, k: int):
  if k == 1:
    return [member]
  return [member[i] for i in range(k)]


def _dtypes(type_spec: tff.Type):
  """A Python structure of dtypes shaped like `type_spec` (for packing)."""
  if isinstance(type_spec, tff.TensorType):
    return tf.dtypes.as_dtype(type_spec.dtype)
  container = getattr(type_spec, 'python_container', None)
  elements = [(n, _dtypes(t)) for n, t in tff.structure.iter_elements(
      type_spec)]
  if container is not None and issubclass(container, dict):
    return container(elements)
  if all(n is None for n, _ in elements):
    return tuple(t for _, t in elements)
  return collections.OrderedDict(elements)


def _output(result, clipped_count, derivative_clipped_count):
  return collections.OrderedDict(
      result=result, clipped_count=clipped_count,
      derivative_clipped_count=derivative_clipped_count)


class SecureSum(primitives.Primitive):
  """{T}@CLIENTS -> <result=T, clipped_count=int64,
  derivative_clipped_count=int64>@SERVER, summed securely."""

  name = 'federated_secure_sum'

  def infer(self, inputs, plan):
    (x,) = inputs
    primitives.require_placement(self.name, 'value', x, tff.CLIENTS)
    if not isinstance(x.member, (tff.TensorType, tff.StructType)) or (
        fad_types.non_float_leaves(x.member)):
      raise errors.FederatedADError(
          f'tff_fad.federated_secure_sum needs floating-point tensors; '
          f'{x.name} has type {x.type_signature}.')
    fad_types.num_elements(x.member)  # Fully defined shapes only.
    return tff.FederatedType(
        tff.StructWithPythonType(
            list(_output(x.member, np.int64, np.int64).items()),
            collections.OrderedDict),
        tff.SERVER)

  def primal(self, inputs, plan):
    total, clipped = _secure_sum_leaves(inputs[0], [plan.value])
    return primitives.local_call(
        lambda t, c: _output(t, c[0], tf.constant(0, tf.int64)),
        [total, clipped])

  def why_not_differentiable(self, node, mode):
    plan = node.params['plan']
    if mode == 'forward' and plan.tangent is None:
      return ('forward mode sums tangents securely, each with its own range: '
              'give federated_secure_sum a tangent_clip_range.')
    return ''

  def jvp(self, inputs, active, num_directions, plan):
    value_q = plan.value

    def masked(x_dx):
      x, dx = x_dx
      # d clip(x) / dx = in_range(x); broadcasting covers batched directions.
      dx = tf.nest.map_structure(
          lambda a, d: d * value_q.in_range(a), x, dx)
      return x, dx

    pair = primitives.local_call(masked, [inputs[0].packed()])
    totals, clipped = _secure_sum_leaves(pair, [plan.value, plan.tangent])

    def finish(t, c):
      value = _output(t[0], c[0], c[1])
      tangent = _output(t[1], local_ad.structural_zero(num_directions),
                        local_ad.structural_zero(num_directions))
      return value, tangent

    return primitives.Dual(
        packed=primitives.local_call(finish, [totals, clipped]))

  def transpose(self, cotangent, inputs, residuals, active, plan):
    ct = primitives.local_call(lambda c: c['result'], [cotangent])
    at_clients = primitives.emit_broadcast(ct)

    def client_cotangent(c, x):
      return tf.nest.map_structure(
          lambda a, cc: cc * plan.value.in_range(a), x, c)

    return [primitives.local_call(client_cotangent,
                                  [at_clients, inputs()[0]])]


SECURE_SUM = SecureSum()


def federated_secure_sum(
    value: ir.Value,
    clip_range: Range,
    num_clients_bound: int,
    bitwidth: Optional[int] = None,
    tangent_clip_range: Optional[Range] = None,
    cotangent_clip_range: Optional[Range] = None,
    return_clipped_count: bool = False,
):
  """Differentiable secure sum of floats: {T}@CLIENTS -> T@SERVER.

  Each float element is clipped to `clip_range`, quantized to `bitwidth`
  bits and summed with `tff.federated_secure_sum_bitwidth`. For `n` clients
  the result is within `n (U - L) / (2 (2**bitwidth - 1))` of the exact sum
  of the clipped values, per element (plus float32 rounding); see the module
  docstring. Derivatives are summed securely too, each with its own range.

  Args:
    value: Floating-point tensors (or a structure of them) at the clients,
      with fully defined shapes.
    clip_range: `(L, U)`: client values are clipped to it (and counted).
    num_clients_bound: The largest number of clients a run may have; the
      secure sum's bit width is chosen so their sum cannot overflow, and a
      run with more clients fails.
    bitwidth: Bits per quantized value; None picks the most that fit, at
      most 24 (float32's precision).
    tangent_clip_range: Range of the tangents in forward mode (tangents of
      clipped elements are 0: the derivative of clipping). Required for
      forward mode.
    cotangent_clip_range: Range of the client cotangents summed in reverse
      mode by the broadcasts whose client values flow into `value` (their
      transposes become secure sums). Required for reverse mode when
      `value` depends on a broadcast of a differentiated value.
    return_clipped_count: Also return how many elements the primal clipped.

  Returns:
    The sum, T@SERVER; with `return_clipped_count`, the pair
    `(sum, clipped_count)` where `clipped_count` is int64@SERVER (in a
    forward-mode derivative, clipped tangent elements are added to it).

  Raises:
    ValueError: for a malformed range, a non-positive client bound, or a
      configuration whose secure sum could overflow.
  """
  if isinstance(num_clients_bound, bool) or not isinstance(
      num_clients_bound, int) or num_clients_bound < 1:
    raise ValueError(
        f'num_clients_bound must be a positive int, found '
        f'{num_clients_bound!r}.')
  plan = SecureSumPlan(
      value=make_quantizer('clip_range', clip_range, bitwidth,
                           num_clients_bound),
      tangent=make_quantizer('tangent_clip_range', tangent_clip_range,
                             bitwidth, num_clients_bound),
      cotangent=make_quantizer('cotangent_clip_range', cotangent_clip_range,
                               bitwidth, num_clients_bound),
  )
  if plan.value is None:
    raise ValueError('clip_range is required: (lower, upper).')
  out = primitives.bind(SECURE_SUM, [value], plan=plan)
  cotangent_sums.mark_upstream_broadcasts(
      value, _SecureCotangentSum(plan.cotangent, out.name))
  total = out['result']
  if not return_clipped_count:
    return total
  clipped = primitives.federated_apply(
      lambda o: o['clipped_count'] + o['derivative_clipped_count'], out)
  return total, clipped


_SIMULATION_CONTEXT = None


@contextlib.contextmanager
def secure_simulation_context() -> Iterator[object]:
  """Runs TFF computations in TFF's test context, which simulates secure sums.

  TFF's default C++ context cannot execute `federated_secure_sum(_bitwidth)`
  (it fails with `_InactiveRpcError: Cannot embed a federated value`). Inside
  this context manager every computation (primal or derivative) runs in
  `tff.backends.test`'s context, where the secure intrinsics are replaced by
  insecure simulations with the same results. It is for simulation only:
  production secure aggregation needs a runtime that implements it.

  Yields:
    The installed execution context (one per process, reused).
  """
  global _SIMULATION_CONTEXT
  if _SIMULATION_CONTEXT is None:
    _SIMULATION_CONTEXT = (
        tff.backends.test.create_sync_test_cpp_execution_context())
  with tff.framework.get_context_stack().install(_SIMULATION_CONTEXT):
    yield _SIMULATION_CONTEXT
