"""Communication cost of a federated computation, read off its building blocks.

`communication_cost` walks the compiled computation itself (the intrinsic
calls TFF will run and their types), so it cannot disagree with what runs.
Bytes are counted from the value types: a broadcast sends its member type to
every client; an aggregation receives its member type from every client.
"""

import collections
import dataclasses
from typing import Any, Dict, List, Tuple, Union

import tensorflow_federated as tff

from tff_fad.core import types as fad_types
# Building blocks are TFF's compiled form, private in TFF 0.87.
from tff_fad.core.tff_internals import building_blocks as bb

DOWNLINK = frozenset({'federated_broadcast'})
UPLINK = frozenset({
    'federated_sum', 'federated_mean', 'federated_weighted_mean',
    'federated_secure_sum', 'federated_secure_sum_bitwidth',
    'federated_secure_modular_sum', 'federated_aggregate', 'federated_min',
    'federated_max',
})


@dataclasses.dataclass(frozen=True)
class CommunicationCost:
  """What one execution of a computation sends over the network.

  Attributes:
    num_clients: The number of clients the figures are computed for.
    server_to_client_bytes_per_client: Downlink bytes each client receives.
    client_to_server_bytes_per_client: Uplink bytes each client sends.
    server_to_client_bytes: Total downlink bytes (per client x clients).
    client_to_server_bytes: Total uplink bytes (per client x clients).
    communication_steps: Longest chain of dependent communications
      (broadcasts and aggregations each count one).
    round_trips: Longest chain of dependent aggregations: how many times the
      server must wait for clients.
    intrinsics: Calls per communication intrinsic.
  """

  num_clients: int
  server_to_client_bytes_per_client: int
  client_to_server_bytes_per_client: int
  server_to_client_bytes: int
  client_to_server_bytes: int
  communication_steps: int
  round_trips: int
  intrinsics: Dict[str, int]

  def __str__(self):
    calls = ', '.join(f'{k} x{v}' for k, v in sorted(self.intrinsics.items()))
    return (
        f'{self.num_clients} clients: '
        f'{self.server_to_client_bytes_per_client} B down / '
        f'{self.client_to_server_bytes_per_client} B up per client, '
        f'{self.communication_steps} steps, {self.round_trips} round trip(s) '
        f'[{calls}]'
    )


def _body(computation: Any) -> bb.ComputationBuildingBlock:
  """The building block a call of `computation` evaluates."""
  computation = getattr(computation, 'primal', computation)
  if not isinstance(computation, tff.Computation):
    raise TypeError(
        'communication_cost needs a tff.Computation or a tff_fad '
        f'FederatedComputation, found {computation!r}.'
    )
  block = computation.to_building_block()
  return block.result if isinstance(block, bb.Lambda) else block


def _uplink_type(uri: str, argument: bb.ComputationBuildingBlock) -> tff.Type:
  arg_type = argument.type_signature
  if uri == 'federated_weighted_mean':
    return tff.StructType([arg_type[0].member, arg_type[1].member])
  if uri in ('federated_aggregate', 'federated_secure_sum_bitwidth',
             'federated_secure_sum', 'federated_secure_modular_sum'):
    return arg_type[0].member
  return arg_type.member


# A depth is (communication steps, round trips) for a value, or a list of
# depths for a struct, so selecting one member of a called computation's
# result does not inherit the depth of its other members.
Depth = Union[Tuple[int, int], List['Depth']]


def _collapse(depth: Depth) -> Tuple[int, int]:
  if isinstance(depth, list):
    return max((_collapse(d) for d in depth), default=(0, 0))
  return depth


class _Walker:
  """Evaluates dependency depth while recording each communication once."""

  def __init__(self):
    self.down = 0
    self.up = 0
    self.calls = collections.Counter()
    self.all_intrinsics = collections.Counter()

  def visit(self, block, env: Dict[str, Depth]) -> Depth:
    if isinstance(block, bb.Reference):
      return env.get(block.name, (0, 0))
    if isinstance(block, bb.Selection):
      source = self.visit(block.source, env)
      if isinstance(source, list):
        return source[block.as_index()]
      return source
    if isinstance(block, bb.Struct):
      return [self.visit(c, env) for c in block.children()]
    if isinstance(block, bb.Block):
      env = dict(env)
      for name, local in block.locals:
        env[name] = self.visit(local, env)
      return self.visit(block.result, env)
    if isinstance(block, bb.Lambda):
      # A function value (e.g. the argument of federated_map): its body runs
      # where it is called; only federated bodies communicate.
      self.visit(block.result, env)
      return (0, 0)
    if isinstance(block, bb.Call):
      arg_depth = (
          self.visit(block.argument, env) if block.argument is not None
          else (0, 0))
      fn = block.function
      if isinstance(fn, bb.Lambda):
        inner = dict(env)
        if fn.parameter_name is not None:
          inner[fn.parameter_name] = arg_depth
        return self.visit(fn.result, inner)
      if isinstance(fn, bb.Intrinsic):
        return self._intrinsic(fn.uri, block.argument, _collapse(arg_depth))
      return _collapse(arg_depth)
    if isinstance(block, bb.Intrinsic):
      self.all_intrinsics[block.uri] += 1
    return (0, 0)

  def _intrinsic(self, uri, argument, depth: Tuple[int, int]) -> Depth:
    self.all_intrinsics[uri] += 1
    steps, trips = depth
    if uri in DOWNLINK:
      self.calls[uri] += 1
      self.down += fad_types.num_bytes(argument.type_signature.member)
      return steps + 1, trips
    if uri in UPLINK:
      self.calls[uri] += 1
      self.up += fad_types.num_bytes(_uplink_type(uri, argument))
      return steps + 1, trips + 1
    return depth


def communication_cost(computation: Any, num_clients: int) -> CommunicationCost:
  """Bytes and sequential steps of one run of `computation`.

  Args:
    computation: A `tff.Computation` (e.g. one returned by `tff_fad.jvp`) or
      a tff_fad `FederatedComputation` (its primal is measured).
    num_clients: How many clients take part.

  Returns:
    A `CommunicationCost`.

  Raises:
    ValueError: if a communicated value has a dimension of unknown size.
  """
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or (
      num_clients <= 0):
    raise ValueError(f'num_clients must be a positive int, found {num_clients!r}.')
  walker = _Walker()
  steps, trips = _collapse(walker.visit(_body(computation), {}))
  return CommunicationCost(
      num_clients=num_clients,
      server_to_client_bytes_per_client=walker.down,
      client_to_server_bytes_per_client=walker.up,
      server_to_client_bytes=walker.down * num_clients,
      client_to_server_bytes=walker.up * num_clients,
      communication_steps=steps,
      round_trips=trips,
      intrinsics=dict(walker.calls),
  )


def intrinsics_used(computation: Any) -> Dict[str, int]:
  """Every intrinsic the computation calls, with counts (for closure checks)."""
  walker = _Walker()
  walker.visit(_body(computation), {})
  return dict(walker.all_intrinsics)
