"""Private cotangent sums: keeping reverse mode as private as the primal.

In a reverse-mode derivative program, client data reaches the server through
the transposes of broadcasts: the cotangent of `broadcast(w)` at client `i`
is client `i`'s contribution to the gradient (it depends on its data), and
the transpose sums these over clients. If the primal aggregated that client
data with a secure sum or a DP factory, a plain `federated_sum` in the
derivative would release, in the clear, data the primal protected.

So every private aggregation point (`federated_secure_sum`,
`aggregate_with_factory`) marks, when it is traced, the broadcasts whose
client values flow into it through client-local computation: their
transposes use the aggregation the point declares for cotangents (a secure
sum with its own clipping range, or a `tff.aggregators` factory). A marked
broadcast whose point gave no cotangent aggregation, or that feeds points
with incompatible ones, cannot be differentiated in reverse mode and says so
at transform time. Forward mode and the primal are unchanged: a broadcast
sends server data only.
"""

from typing import Any, List, Optional, Sequence

import tensorflow_federated as tff

from tff_fad.core import ir
from tff_fad.core import primitives

REVERSE_MODES = ('reverse', 'reverse_recompute')


class CotangentAggregation:
  """How a marked broadcast sums its client cotangents (one per request).

  Subclasses implement `merge` (combine with another request on the same
  broadcast, or return None if they cannot be combined) and `emit`.
  """

  # Program values (server-placed) the aggregation reads, e.g. its state.
  extra_inputs: Sequence[ir.Value] = ()

  def describe(self) -> str:
    raise NotImplementedError

  def merge(self, other: 'CotangentAggregation'
            ) -> Optional['CotangentAggregation']:
    raise NotImplementedError

  def missing_reason(self) -> str:
    """Why this request cannot produce a cotangent sum, or ''."""
    return ''

  def emit(self, client_cotangents: Any, extra_values: List[Any],
           member_type: tff.Type) -> Any:
    """Emits the aggregation of `{ct}@CLIENTS` into `ct@SERVER`."""
    raise NotImplementedError

  def release_factory(self) -> Any:
    """The `tff.aggregators` factory releasing the sum (None: secure sum)."""
    return None


class PrivateBroadcast(primitives.Broadcast):
  """A broadcast whose transpose aggregates cotangents privately.

  One instance per marked node: it holds the requests of the aggregation
  points that node feeds. Extra node inputs after the broadcast value are
  the server values (aggregator states) the requests read.
  """

  def __init__(self, requests: List[CotangentAggregation]):
    self.requests = list(requests)

  def merged(self) -> Optional[CotangentAggregation]:
    merged = self.requests[0]
    for request in self.requests[1:]:
      merged = merged.merge(request)
      if merged is None:
        return None
    return merged

  def primal(self, inputs):
    return tff.federated_broadcast(inputs[0])

  def jvp(self, inputs, active, num_directions):
    return inputs[0].broadcast()

  def why_not_differentiable(self, node: ir.Node, mode: str) -> str:
    if mode not in REVERSE_MODES:
      return ''
    merged = self.merged()
    if merged is None:
      points = '; '.join(r.describe() for r in self.requests)
      return (
          f'its client values feed several private aggregation points whose '
          f'cotangent aggregations cannot be combined ({points}). Give them '
          'the same cotangent aggregation.')
    reason = merged.missing_reason()
    if reason:
      return (
          f'its client cotangents carry client data into a private '
          f'aggregation point ({merged.describe()}), but {reason}')
    return ''

  def transpose(self, cotangent, inputs, residuals, active):
    values = inputs()
    merged = self.merged()
    member = values[0].type_signature.member
    extra = self._extra_values(values)
    total = merged.emit(cotangent, [extra[id(v)] for v in
                                    merged.extra_inputs], member)
    return [total] + [None] * (len(values) - 1)

  def _extra_values(self, values):
    # Node inputs after the first are the union of the requests' extras.
    extras = {}
    for value, tff_value in zip(self.extra_program_values, values[1:]):
      extras[id(value)] = tff_value
    return extras

  @property
  def extra_program_values(self) -> List[ir.Value]:
    seen, ordered = set(), []
    for request in self.requests:
      for value in request.extra_inputs:
        if id(value) not in seen:
          seen.add(id(value))
          ordered.append(value)
    return ordered


def upstream_broadcasts(value: ir.Value) -> List[ir.Node]:
  """Broadcast nodes whose client outputs flow into the client `value`.

  Walks back through client-placed computation (maps, selections) and stops
  at broadcasts and client parameters: everything upstream of a broadcast
  is at the server and sends no client data.
  """
  found, seen, stack = [], set(), [value]
  while stack:
    v = stack.pop()
    if v in seen or v.placement is not tff.CLIENTS or v.producer is None:
      continue
    seen.add(v)
    node = v.producer
    if isinstance(node.primitive, primitives.Broadcast):
      if node not in found:
        found.append(node)
      continue
    stack.extend(node.inputs)
  return found


def mark_upstream_broadcasts(value: ir.Value,
                             request: CotangentAggregation) -> List[ir.Node]:
  """Makes the transposes of `value`'s upstream broadcasts private.

  Args:
    value: The client-placed value a private aggregation point aggregates.
    request: How that point wants client cotangents summed.

  Returns:
    The marked broadcast nodes.

  Raises:
    ValueError: if a server value the request reads (e.g. an aggregator
      state) is computed after a broadcast it must be read by; pass the state
      as a program parameter or compute it earlier.
  """
  program = ir.current_program('federated_broadcast')
  order = {n.output: i for i, n in enumerate(program.nodes)}
  nodes = upstream_broadcasts(value)
  for node in nodes:
    for extra in request.extra_inputs:
      if order.get(extra, -1) > order[node.output]:
        raise ValueError(
            f'{extra.name} (read by {request.describe()}) is computed after '
            f'`{node.describe()}`, whose cotangent sum needs it; compute it '
            'before that broadcast or pass it as a program parameter.')
    primitive = node.primitive
    if not isinstance(primitive, PrivateBroadcast):
      primitive = PrivateBroadcast([])
    primitive.requests.append(request)
    node.primitive = primitive
    # The transpose reads the requests' server values through node.inputs,
    # which both reverse modes provide (kept or re-materialized).
    node.inputs = (node.inputs[0],) + tuple(primitive.extra_program_values)
  return nodes
