"""Splitting a federated computation into stages at its aggregations.

TFF's mergeable execution context (what `tff_fad.workers` runs on) splits a
computation over several workers only when it has one layer of aggregation:
broadcast -> client work -> aggregation -> server work. A reverse-mode
derivative aggregates, broadcasts the cotangent and aggregates again; a
program of several rounds aggregates once per round. `split_into_stages`
cuts such a computation into a sequence of one-layer computations (stages):

  stage k: (the computation's argument, server values the stage needs from
            earlier stages) -> server values later stages or the result need
  last stage: (argument, server values) -> the computation's result

It works on TFF's own compiled form (the call-dominant form that
`compile_to_mergeable_comp_form` also uses), so it splits any
`tff.Computation`: a tff_fad program or its derivatives, and learning
processes that call them together with `tff.aggregators`.

What crosses a stage boundary is server-placed: TFF workers do not keep
values of anonymous clients between calls, so a client value that a later
stage needs is computed again there from the client data and the server
values broadcast to it (the client data is sent to the workers once per
stage, as TFF does for any call). A stateful `'reverse'` derivative, whose
backward sweep reuses the clients' forward values, therefore runs on workers
as `'reverse_recompute'` does. Client computations, and unplaced ones, that
draw unseeded random numbers would draw them again in a later stage; tff_fad's
own randomness (BAFFLE's directions, seeded tangents) is seeded, so it
repeats exactly.
"""

import dataclasses
import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import tensorflow_federated as tff

from tff_fad.core import cost
# TFF's compiler (building blocks, call-dominant form), which
# `compile_to_mergeable_comp_form` is built from; private in TFF 0.87.
from tff_fad.core.tff_internals import building_blocks as bb
from tff_fad.core.tff_internals import computation_impl
from tff_fad.core.tff_internals import intrinsic_defs
from tff_fad.core.tff_internals import transformation_utils
from tff_fad.core.tff_internals import transformations

_AGGREGATIONS = frozenset(
    d.uri for d in intrinsic_defs.get_aggregation_intrinsics())


@dataclasses.dataclass(frozen=True)
class Stage:
  """One layer of aggregation, as a computation TFF's workers can split.

  Attributes:
    computation: `stage(arg)` for the first stage, `stage(<arg, carried_in>)`
      for the others, where `arg` is the split computation's argument
      (`stage(carried_in)` if it takes none).
      Returns the server values `carried_out` names (the result, last).
    carried_in: Names of the server values this stage receives.
    carried_out: Names of the server values it returns to later stages (empty
      for the last stage, which returns the computation's result).
  """

  computation: tff.Computation
  carried_in: Tuple[str, ...]
  carried_out: Tuple[str, ...]


def _unbound_names(value: bb.ComputationBuildingBlock) -> Set[str]:
  return transformation_utils.get_map_of_unbound_references(value)[value]


def _intrinsic_uri(value: bb.ComputationBuildingBlock) -> Optional[str]:
  if isinstance(value, bb.Call) and isinstance(value.function, bb.Intrinsic):
    return value.function.uri
  return None


def _is_server_value(value: bb.ComputationBuildingBlock) -> bool:
  type_spec = value.type_signature
  return (isinstance(type_spec, tff.FederatedType)
          and type_spec.placement is tff.SERVER)


def _call_dominant(comp: tff.Computation) -> Optional[bb.Lambda]:
  """`comp` as one lambda over a block of locals (TFF's call-dominant form).

  None for a computation that is not a lambda (a TensorFlow computation has
  no federated part to split).
  """
  block = comp.to_building_block()
  if not isinstance(block, bb.Lambda):
    return None
  return bb.Lambda(block.parameter_name, block.parameter_type,
                   transformations.to_call_dominant(block.result))


def _unused_parameter_name(taken: Set[str]) -> str:
  for i in itertools.count():
    name = f'_stage_arg{i}'
    if name not in taken:
      return name


def split_into_stages(comp: tff.Computation) -> List[Stage]:
  """Cuts `comp` into stages of one aggregation layer each.

  Args:
    comp: A `tff.Computation`: a tff_fad program (or derivative program), or
      e.g. a learning process's `next`.

  Returns:
    The stages in order. A computation with at most one layer of aggregation
    is one stage: the computation itself.
  """
  comp = getattr(comp, 'primal', comp)
  lam = _call_dominant(comp)
  if lam is None:
    return [Stage(comp, (), ())]
  body = lam.result
  locals_ = list(body.locals) if isinstance(body, bb.Block) else []
  result = body.result if isinstance(body, bb.Block) else body
  values = dict(locals_)
  inputs = {name: _unbound_names(value) & values.keys()
            for name, value in locals_}

  # The number of aggregations on the longest path to each local: the stage
  # after which a server value is known.
  depth: Dict[str, int] = {}
  for name, value in locals_:
    depth[name] = max((depth[x] for x in inputs[name]), default=0) + (
        _intrinsic_uri(value) in _AGGREGATIONS)
  result_inputs = _unbound_names(result) & values.keys()
  num_stages = max((depth[x] for x in result_inputs), default=0)
  if num_stages <= 1:
    return [Stage(comp, (), ())]

  # From the last stage back: what each stage computes, and the server values
  # it takes from earlier stages instead of computing them.
  needed_by_stage: List[Set[str]] = [set() for _ in range(num_stages)]
  carried_in: List[Tuple[str, ...]] = [() for _ in range(num_stages)]
  targets = result_inputs
  for k in reversed(range(num_stages)):
    computed, carried = needed_by_stage[k], set()
    pending = list(targets)
    while pending:
      name = pending.pop()
      if name in computed or name in carried:
        continue
      # In call-dominant form every local is a call (selections of the
      # argument stay inline): server values earlier stages computed are
      # carried, not computed again.
      if k > 0 and depth[name] <= k and _is_server_value(values[name]):
        carried.add(name)
        continue
      computed.add(name)
      pending.extend(inputs[name])
    carried_in[k] = tuple(sorted(carried))
    targets = carried

  arg_name = _unused_parameter_name(set(values) | {lam.parameter_name or ''})
  stages = []
  for k in range(num_stages):
    last = k == num_stages - 1
    carried_out = () if last else carried_in[k + 1]
    stage_locals = [(n, v) for n, v in locals_ if n in needed_by_stage[k]]
    if last:
      stage_result = result
    else:
      stage_result = bb.Struct(
          [(n, bb.Reference(n, values[n].type_signature)) for n in carried_out])
    stages.append(Stage(
        _stage_computation(lam, k, carried_in[k], stage_locals, stage_result,
                           values, arg_name,
                           comp.type_signature.result if last else None),
        carried_in[k], carried_out))
  return stages


def _stage_computation(lam, k, carried_in, stage_locals, stage_result, values,
                       arg_name, result_type):
  """The lambda of stage `k`, as a `tff.Computation`."""
  if k == 0:
    parameter_name, parameter_type = lam.parameter_name, lam.parameter_type
    bindings = []
  else:
    carried_type = tff.StructType(
        [(n, values[n].type_signature) for n in carried_in])
    if lam.parameter_type is None:
      parameter_type = carried_type
      carried = bb.Reference(arg_name, parameter_type)
      bindings = []
    else:
      parameter_type = tff.StructType([lam.parameter_type, carried_type])
      argument = bb.Reference(arg_name, parameter_type)
      carried = bb.Selection(argument, index=1)
      bindings = [(lam.parameter_name, bb.Selection(argument, index=0))]
    bindings += [(n, bb.Selection(carried, index=i))
                 for i, n in enumerate(carried_in)]
    parameter_name = arg_name
  body = bb.Block(bindings + stage_locals, stage_result)
  stage = computation_impl.ConcreteComputation.from_building_block(
      bb.Lambda(parameter_name, parameter_type, body))
  if result_type is not None:
    # The result keeps the Python containers of the split computation's.
    stage = computation_impl.ConcreteComputation.with_type(
        stage, tff.FunctionType(parameter_type, result_type))
  return stage


def run_stages(stages: Sequence[Stage], arg: Any,
               invoke: Callable[[tff.Computation, Any], Any]) -> Any:
  """Runs `stages` on `arg`, each with `invoke(computation, argument)`."""
  carried = None
  for k, stage in enumerate(stages):
    if k == 0:
      stage_arg = arg
    elif arg is None:
      stage_arg = carried
    else:
      stage_arg = tff.structure.Struct([(None, arg), (None, carried)])
    carried = invoke(stage.computation, stage_arg)
  return carried


def communication_cost_per_stage(
    comp: Any, num_clients: int) -> List[cost.CommunicationCost]:
  """`communication_cost` of each stage of `comp` (see `split_into_stages`).

  A client value that a later stage recomputes needs the server values it
  was computed from broadcast again: those broadcasts are in its stage's
  cost.
  """
  return [cost.communication_cost(stage.computation, num_clients)
          for stage in split_into_stages(comp)]
