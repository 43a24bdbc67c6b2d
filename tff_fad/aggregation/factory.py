"""`tff.aggregators` factories as differentiable aggregation points.

`aggregate_with_factory(value, state, point)` runs an unweighted
`tff.aggregators` factory's process (DifferentiallyPrivateFactory's
gaussian_fixed / gaussian_adaptive / tree_aggregation, clipping and zeroing
factories, SecureSumFactory, SumFactory, ...) on `{T}@CLIENTS`. The
aggregator's state is threaded through the program like TFF's learning
processes do: an `AggregationPoint` declares the state type, the program
takes the state as a parameter and returns the new one.

Derivatives. The derivative rules treat the aggregation as its ideal linear
map `c * sum_i x_i` (no clipping, no noise; `c` is `transpose_scale`) and
release every derivative aggregate through its own factory:

  pass       what is aggregated                 by
  ---------  ---------------------------------  --------------------------
  primal     x                                  factory
  forward    x and, in parallel, dx             factory, tangent_factory
  reverse    x (forward sweep); the cotangents  factory; cotangent_factory
             of the broadcasts feeding x        (their transposes)
  transpose  none: broadcast of c * ct          (server to clients)

The state is one server struct `<value, tangent, cotangent>` holding the
three processes' states (an empty struct for a factory not given). The
primal updates `value`; forward mode also updates `tangent`. In reverse mode
the cotangent aggregation runs from the `cotangent` state passed in and its
new state is not returned (a vjp returns only cotangents), so only factories
whose state never changes are accepted as `cotangent_factory` (fixed-noise
Gaussian DP, fixed clipping, secure sums); adaptive clipping and tree
aggregation are refused there.
"""

import collections
from typing import Any, NamedTuple, Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_fad.aggregation import cotangent_sums
from tff_fad.core import errors
from tff_fad.core import ir
from tff_fad.core import local_ad
from tff_fad.core import primitives
from tff_fad.core import types as fad_types

_EMPTY = tff.StructType([])


def _zeros_of(type_spec: tff.Type):
  """A TF structure of zeros ('' for strings) of `type_spec`.

  Unknown dimensions get size 0. Used for the tangent measurements of a
  primal, which runs no tangent process.
  """
  if isinstance(type_spec, tff.TensorType):
    dtype = tf.dtypes.as_dtype(type_spec.dtype)
    shape = [0 if d is None else d for d in type_spec.shape]
    if dtype == tf.string:
      return tf.fill(shape, '')
    return tf.zeros(shape, dtype)
  elements = list(tff.structure.iter_elements(type_spec))
  if any(n is not None for n, _ in elements):
    return collections.OrderedDict((n, _zeros_of(t)) for n, t in elements)
  return tuple(_zeros_of(t) for _, t in elements)


def _is_fixed_state(factory) -> Optional[str]:
  """Why `factory`'s state may change between calls, or None if it cannot."""
  if isinstance(factory, tff.aggregators.DifferentiallyPrivateFactory):
    # The public API hides the DP query; its class says whether the state
    # evolves (adaptive clip norm, tree-aggregation noise buffers).
    query = getattr(factory, '_query', None)
    inner = getattr(query, '_numerator', query)
    name = type(inner).__name__
    if name != 'GaussianSumQuery':
      return f'its DP query {name} keeps evolving state'
  return None


def linear_scale(factory) -> Optional[float]:
  """`c` with `factory`'s aggregate ~ `c * sum_i x_i`, or None if unknown.

  1 for sums (SumFactory, SecureSumFactory, and assumed for any other
  factory, e.g. clipping/zeroing wrappers);
  `1 / clients_per_round` for DifferentiallyPrivateFactory, whose DP query
  divides by it; None for means over the actual clients.
  """
  if isinstance(factory, tff.aggregators.DifferentiallyPrivateFactory):
    denominator = getattr(getattr(factory, '_query', None), '_denominator',
                          None)
    return 1.0 if denominator is None else 1.0 / float(denominator)
  if isinstance(factory, (tff.aggregators.UnweightedMeanFactory,
                          tff.aggregators.MeanFactory)):
    return None
  # Sums, and clipping/zeroing wrappers (which hide their inner factory) are
  # assumed to wrap a sum: pass transpose_scale if yours wraps a mean.
  return 1.0


class AggregationPoint:
  """Factories for one differentiable aggregation point, and its state.

  Attributes:
    value_type: The client value type `T` (without placement).
    state_type: `<value, tangent, cotangent>@SERVER`, the state to thread.
    process: The value's `tff.templates.AggregationProcess`.
  """

  def __init__(
      self,
      factory: tff.aggregators.UnweightedAggregationFactory,
      value_type: Any,
      *,
      tangent_factory: Optional[
          tff.aggregators.UnweightedAggregationFactory] = None,
      cotangent_factory: Optional[
          tff.aggregators.UnweightedAggregationFactory] = None,
      cotangent_type: Any = None,
      num_directions: Optional[int] = None,
      transpose_scale: Optional[float] = None,
      name: str = 'aggregation_point',
  ):
    """Creates the processes.

    Args:
      factory: Aggregates the values (an unweighted factory).
      value_type: The member type `T` of `{T}@CLIENTS`.
      tangent_factory: Aggregates tangents in forward mode (required there).
        To use no privacy for them, pass `tff.aggregators.SumFactory()`.
      cotangent_factory: Sums the client cotangents of the broadcasts whose
        client values flow into this point, in reverse mode (required
        there); its state must not evolve.
      cotangent_type: The member type of those cotangents (the broadcast
        value's type); defaults to `value_type`.
      num_directions: The number of batched tangent directions the forward
        mode will use (None for one direction).
      transpose_scale: `c` in the linearization `c * sum_i x_i` of
        `factory`; None detects it (see `linear_scale`: 1 for sums,
        `1 / clients_per_round` for DifferentiallyPrivateFactory). The
        cotangent factory's own scale is detected and divided out, so it
        releases a sum.
      name: Used in error messages and privacy reports.

    Raises:
      TypeError: if a factory is not an unweighted aggregation factory.
      ValueError: if `cotangent_factory` has evolving state.
    """
    for arg, f in (('factory', factory), ('tangent_factory', tangent_factory),
                   ('cotangent_factory', cotangent_factory)):
      if f is not None and not isinstance(
          f, tff.aggregators.UnweightedAggregationFactory):
        raise TypeError(
            f'{name}: {arg} must be a tff.aggregators.'
            f'UnweightedAggregationFactory, found {f!r}.')
    if cotangent_factory is not None:
      reason = _is_fixed_state(cotangent_factory)
      if reason:
        raise ValueError(
            f'{name}: cotangent_factory is refused: {reason}, but reverse '
            'mode cannot return its new state. Use a fixed-noise factory '
            '(e.g. DifferentiallyPrivateFactory.gaussian_fixed).')
    self.name = name
    self.factory = factory
    self.tangent_factory = tangent_factory
    self.cotangent_factory = cotangent_factory
    self.value_type = tff.types.to_type(value_type)
    self.cotangent_type = fad_types.tangent_type(
        self.value_type if cotangent_type is None
        else tff.types.to_type(cotangent_type))
    self.num_directions = num_directions
    self.transpose_scale = linear_scale(factory) if transpose_scale is None \
        else float(transpose_scale)
    self.cotangent_scale = None if cotangent_factory is None else (
        linear_scale(cotangent_factory))
    if cotangent_factory is not None and self.cotangent_scale is None:
      raise ValueError(
          f'{name}: cotangent_factory {cotangent_factory!r} averages over the '
          'participating clients; reverse mode needs a sum (e.g. '
          'DifferentiallyPrivateFactory.gaussian_fixed or SumFactory).')
    self.process = factory.create(self.value_type)
    self.tangent_process = None if tangent_factory is None else (
        tangent_factory.create(
            fad_types.tangent_type(self.value_type, num_directions)))
    self.cotangent_process = None if cotangent_factory is None else (
        cotangent_factory.create(self.cotangent_type))
    self.state_type = tff.FederatedType(
        tff.StructWithPythonType(
            [('value', self._state_member(self.process)),
             ('tangent', self._state_member(self.tangent_process)),
             ('cotangent', self._state_member(self.cotangent_process))],
            collections.OrderedDict),
        tff.SERVER)
    self.initialize = self._build_initialize()

  @staticmethod
  def _state_member(process):
    if process is None:
      return _EMPTY
    return process.initialize.type_signature.result.member

  def _build_initialize(self) -> tff.Computation:
    """`( -> <value, tangent, cotangent>@SERVER)`, the initial state."""

    def init():
      states = []
      for process in (self.process, self.tangent_process,
                      self.cotangent_process):
        states.append(tff.federated_value((), tff.SERVER) if process is None
                      else process.initialize())
      return tff.federated_zip(collections.OrderedDict(
          value=states[0], tangent=states[1], cotangent=states[2]))

    init.__name__ = f'initialize_{self.name}'
    return tff.federated_computation(init)

  def __repr__(self):
    return f'<AggregationPoint {self.name}: {self.value_type}>'


class AggregateOutput(NamedTuple):
  """What `aggregate_with_factory` returns (all at the server)."""

  state: ir.Value
  result: ir.Value
  measurements: ir.Value


def _measurements_type(point: AggregationPoint) -> tff.Type:
  def member(process):
    if process is None:
      return _EMPTY
    return process.next.type_signature.result.measurements.member

  return tff.StructWithPythonType(
      [('value', member(point.process)),
       ('tangent', member(point.tangent_process))], collections.OrderedDict)


class FactoryAggregate(primitives.Primitive):
  """({T}@CLIENTS, S@SERVER) -> <state=S, result=R, measurements=M>@SERVER."""

  name = 'aggregate_with_factory'

  def infer(self, inputs, point):
    x, state = inputs
    primitives.require_placement(self.name, 'value', x, tff.CLIENTS)
    primitives.require_placement(self.name, 'state', state, tff.SERVER)
    if not point.value_type.is_assignable_from(x.member):
      raise errors.FederatedADError(
          f'{point.name} aggregates {point.value_type}, but {x.name} has type '
          f'{x.type_signature}.')
    if not point.state_type.member.is_assignable_from(state.member):
      raise errors.FederatedADError(
          f'{point.name}: state must have type {point.state_type} (from '
          f'the point\'s initialize), but {state.name} has type '
          f'{state.type_signature}.')
    result = point.process.next.type_signature.result.result.member
    return tff.FederatedType(
        tff.StructWithPythonType(
            [('state', point.state_type.member), ('result', result),
             ('measurements', _measurements_type(point))],
            collections.OrderedDict),
        tff.SERVER)

  def _assemble(self, point, state, value_out, tangent_out):
    """Zips the processes' outputs into one `<state, result, measurements>`."""
    if tangent_out is None:
      tangent_state = state[1]
      zeros = _measurements_type(point)[1]
      tangent_measurements = primitives.local_call(
          lambda _: _zeros_of(zeros), [state])
    else:
      tangent_state = tangent_out['state']
      tangent_measurements = tangent_out['measurements']
    new_state = primitives.emit_zip(collections.OrderedDict(
        value=value_out['state'], tangent=tangent_state, cotangent=state[2]))
    measurements = primitives.emit_zip(collections.OrderedDict(
        value=value_out['measurements'], tangent=tangent_measurements))
    return primitives.emit_zip(collections.OrderedDict(
        state=new_state, result=value_out['result'],
        measurements=measurements))

  def primal(self, inputs, point):
    x, state = inputs
    return self._assemble(point, state,
                          _next(point, point.process, state[0], x), None)

  def why_not_differentiable(self, node, mode):
    point = node.params['point']
    if mode != 'forward' and point.transpose_scale is None:
      return (f'{point.name}: the factory averages over the participating '
              'clients, so its transpose is unknown; give transpose_scale.')
    if mode == 'forward' and point.tangent_process is None:
      return (f'{point.name} has no tangent_factory: forward mode releases '
              'an aggregate of tangents and needs a factory for it '
              '(tff.aggregators.SumFactory() for no privacy).')
    return ''

  def jvp(self, inputs, active, num_directions, point):
    x, state = inputs
    if num_directions != point.num_directions:
      raise errors.FederatedADError(
          f'{point.name} was built for num_directions={point.num_directions}'
          f' but the jvp pushes {num_directions}; pass num_directions='
          f'{num_directions} to its AggregationPoint.')
    value_out = _next(point, point.process, state[0], x.primal())
    tangent_out = _next(point, point.tangent_process, state[1], x.tangent())
    out = self._assemble(point, state, value_out, tangent_out)

    def tangent(o, dresult):
      zeros = local_ad.zeros_like_tangent(o, num_directions)
      zeros['result'] = dresult
      return zeros

    return primitives.Dual(
        primal=out,
        tangent=primitives.local_call(tangent, [out, tangent_out['result']]))

  def transpose(self, cotangent, inputs, residuals, active, point):
    scale = point.transpose_scale
    ct = primitives.local_call(
        lambda c: tf.nest.map_structure(lambda t: t * scale, c['result']),
        [cotangent])
    return [primitives.emit_broadcast(ct), None]


FACTORY_AGGREGATE = FactoryAggregate()


def _next(point: AggregationPoint, process, state, value):
  """`process.next(state, value)` as `<state, result, measurements>@SERVER`,
  emitted or recorded (it has no derivative rule of its own)."""

  def run(s, v):
    out = process.next(s, v)
    return tff.federated_zip(collections.OrderedDict(
        state=out.state, result=out.result, measurements=out.measurements))

  return primitives.emit_tff(f'{point.name}.next', run, [state, value])


class _FactoryCotangentSum(cotangent_sums.CotangentAggregation):
  """Sums a broadcast's client cotangents with a point's cotangent factory."""

  def __init__(self, point: AggregationPoint, state: ir.Value):
    self.point = point
    self.extra_inputs = (state,)

  def describe(self):
    return f'aggregate_with_factory({self.point.name})'

  def merge(self, other):
    if isinstance(other, _FactoryCotangentSum) and (
        other.point is self.point and other.extra_inputs[0] is
        self.extra_inputs[0]):
      return self
    return None

  def missing_reason(self):
    if self.point.cotangent_process is None:
      return (f'{self.point.name} has no cotangent_factory; give one so the '
              'cotangent sum is aggregated as privately as the value.')
    return ''

  def emit(self, client_cotangents, extra_values, member_type):
    point = self.point
    expected = tff.FederatedType(point.cotangent_type, tff.CLIENTS)
    if not expected.is_assignable_from(client_cotangents.type_signature):
      raise errors.FederatedADError(
          f'{point.name}: the cotangents to sum have type '
          f'{client_cotangents.type_signature}, but its cotangent_factory '
          f'was created for {expected}; pass cotangent_type= to the '
          'AggregationPoint.')
    (state,) = extra_values
    result = _next(point, point.cotangent_process, state[2],
                   client_cotangents)['result']
    if point.cotangent_scale == 1.0:
      return result
    inverse = 1.0 / point.cotangent_scale  # E.g. DP's 1 / clients_per_round.
    return primitives.local_call(
        lambda r: tf.nest.map_structure(lambda t: t * inverse, r), [result])

  def release_factory(self):
    return self.point.cotangent_factory


def aggregate_with_factory(value: ir.Value, state: ir.Value,
                           point: AggregationPoint) -> AggregateOutput:
  """Aggregates `{T}@CLIENTS` with `point`'s `tff.aggregators` process.

  Args:
    value: The client values, of `point.value_type`.
    state: `point.state_type` (`<value, tangent, cotangent>@SERVER`): a
      program parameter fed from `point.initialize()` or a previous round.
    point: The `AggregationPoint`.

  Returns:
    `AggregateOutput(state, result, measurements)`, all at the server:
    return `state` from the program to thread it. Only `result` carries
    derivatives; `measurements` has the value's and (forward mode) the
    tangent's measurements.
  """
  if not isinstance(point, AggregationPoint):
    raise errors.FederatedADError(
        f'aggregate_with_factory needs an AggregationPoint, found {point!r}.')
  out = primitives.bind(FACTORY_AGGREGATE, [value, state], point=point)
  cotangent_sums.mark_upstream_broadcasts(
      value, _FactoryCotangentSum(point, state))
  return AggregateOutput(
      state=primitives.stop_gradient(out['state']),
      result=out['result'],
      measurements=primitives.stop_gradient(out['measurements']),
  )
