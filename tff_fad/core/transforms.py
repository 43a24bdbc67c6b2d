"""Transforms of traced federated programs into native TFF computations.

`federated_computation` traces a program; `jvp`, `vjp`, `grad` and
`value_and_grad` emit its derivative programs. Every emitted object is a
plain `tff.Computation` built from TFF's own intrinsics, so it runs on TFF's
runtime (and any TFF context) with no tff_fad code at execution time.

Accumulation modes:
  'forward'            Tangents ride with the values: each broadcast and
                       aggregation carries `<value, tangent>` in one message.
                       One pass per tangent direction (batched); no extra
                       communication step.
  'reverse'            A forward sweep, then a backward sweep sending
                       cotangents the other way. Clients keep the inputs of
                       their local functions between the sweeps (stateful).
  'reverse_recompute'  Like 'reverse', but clients keep nothing: in the
                       backward sweep the server re-broadcasts what clients
                       need and clients recompute their forward values.
"""

import collections
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad.core import errors
from tff_fad.core import ir
from tff_fad.core import primitives
from tff_fad.core import types as fad_types

MODES = ('forward', 'reverse', 'reverse_recompute')
Wrt = Union[int, str, Sequence[Union[int, str]]]


class FederatedComputation(tff.Computation):
  """A tff_fad program: a `tff.Computation` that transforms accept.

  `@tff_fad.federated_computation` traces one from Python; `jvp`, `vjp`,
  `grad` and `value_and_grad` return one for the derivative program, so
  derivatives compose (e.g. `jvp(grad(f))`, a Hessian-vector product across
  the communication boundary). Calling it runs the primal on TFF's runtime;
  calling it inside another traced program inlines it.

  Attributes:
    program: The traced `ir.Program`.
    primal: The program as a native `tff.Computation`.
  """

  def __init__(self, program: ir.Program, fn=None):
    self.program = program
    self._fn = fn
    if fn is not None:
      functools.update_wrapper(self, fn)
    else:
      self.__name__ = program.name

  @functools.cached_property
  def primal(self) -> tff.Computation:
    # Built on first use: programs used only through their derivatives (as
    # in the learning algorithms) never pay for TFF tracing the primal.
    return _emit_primal(self.program)

  @property
  def type_signature(self) -> tff.FunctionType:
    return self.primal.type_signature

  def to_building_block(self):
    return self.primal.to_building_block()

  def __call__(self, *args, **kwargs):
    if ir.is_tracing() and any(
        isinstance(a, ir.Value) for a in tf.nest.flatten((args, kwargs))
    ):
      # Called from inside another traced program: inline it, so the outer
      # program can be differentiated through this one.
      if self._fn is not None:
        return self._fn(*args, **kwargs)
      if kwargs:
        raise errors.FederatedADError(
            f'{self.program.name}: pass arguments positionally when calling '
            'a derivative program inside a traced program.')
      return ir.inline(self.program, list(args))
    _check_arguments(self.program, args, kwargs)
    try:
      return self.primal(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      reason = _secure_sum_outside_test_context(self.primal, e)
      if reason:
        raise errors.FederatedADError(reason) from e
      raise

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other

  def __repr__(self):
    return f'<tff_fad.FederatedComputation {self.program.name}: ' \
           f'{self.type_signature}>'


SECURE_INTRINSICS = frozenset({
    'federated_secure_sum', 'federated_secure_sum_bitwidth',
    'federated_secure_modular_sum'})


def secure_intrinsics_used(comp: tff.Computation) -> List[str]:
  """The secure-sum intrinsics `comp` calls, sorted."""
  from tff_fad.core import cost  # pylint: disable=g-import-not-at-top
  return sorted(SECURE_INTRINSICS & set(cost.intrinsics_used(comp)))


def _secure_sum_outside_test_context(comp: tff.Computation,
                                     error: Exception) -> str:
  """Why `comp` failed, if it is TFF's runtime refusing a secure sum."""
  if 'Cannot embed a federated value' not in str(error):
    return ''
  used = secure_intrinsics_used(comp)
  if not used:
    return ''
  return (
      f'{used[0]} cannot run in TFF\'s default execution context: '
      'in simulation, run secure sums inside '
      '`with tff_fad.secure_simulation_context():` (TFF\'s test context '
      'simulates them); production secure aggregation needs a runtime that '
      'implements it.')


def _describe_value(value: Any) -> str:
  if isinstance(value, (list, tuple)) and not hasattr(value, '_fields'):
    return f'a {type(value).__name__} of {len(value)}'
  if isinstance(value, dict):
    return f'a {type(value).__name__} with keys {list(value)}'
  try:
    shape = np.shape(value)
  except ValueError:  # E.g. a namedtuple of differently shaped arrays.
    return f'a {type(value).__name__}'
  dtype = getattr(value, 'dtype', None) or type(value).__name__
  return f'{dtype}{list(shape)}' if shape else f'{dtype} scalar'


def _mismatch(value: Any, type_spec: tff.Type) -> str:
  """Why `value` cannot be a value of `type_spec`, or ''."""
  if isinstance(type_spec, tff.FederatedType):
    if type_spec.placement is tff.CLIENTS and not type_spec.all_equal:
      if not isinstance(value, (list, tuple)) or hasattr(value, '_fields'):
        return (f'must be a list with one value per client, found '
                f'{_describe_value(value)}')
      for i, member in enumerate(value):
        problem = _mismatch(member, type_spec.member)
        if problem:
          return f'(client {i}) {problem}'
      return ''
    return _mismatch(value, type_spec.member)
  if isinstance(type_spec, tff.TensorType):
    # Nested lists of numbers are tensors too (`grad([2., -1.], ...)`).
    try:
      array = np.asarray(value)
    except ValueError:
      array = None
    if isinstance(value, dict) or array is None or array.dtype == object:
      return f'must be a {type_spec} tensor, found {_describe_value(value)}'
    shape = array.shape
    expected = type_spec.shape
    if expected is not None and (len(shape) != len(expected) or any(
        e is not None and e != g for e, g in zip(expected, shape))):
      return (f'must have type {type_spec} (shape {list(expected)}), found '
              f'{_describe_value(array)}')
    return ''
  if isinstance(type_spec, tff.StructType):
    elements = list(tff.structure.iter_elements(type_spec))
    names = [n for n, _ in elements]
    if isinstance(value, dict):
      if all(names) and set(value) != set(names):
        return (f'must have the structure {type_spec} (keys {names}), found '
                f'{_describe_value(value)}')
      members = [value[n] for n in names] if all(names) else list(
          value.values())
    elif isinstance(value, (list, tuple)):
      members = list(value)
    elif hasattr(value, '__attrs_attrs__'):
      members = [getattr(value, n) for n in names]
    else:
      return (f'must have the structure {type_spec}, found '
              f'{_describe_value(value)}')
    if len(members) != len(elements):
      return (f'must have the structure {type_spec} ({len(elements)} '
              f'members), found {_describe_value(value)}')
    for (name, element), member in zip(elements, members):
      problem = _mismatch(member, element)
      if problem:
        return f'[{name!r}] {problem}' if name else problem
    return ''
  return ''  # Sequences and functions: TFF checks them.


def _check_arguments(program: ir.Program, args, kwargs) -> None:
  """Refuses arguments of the wrong structure or shape, naming them."""
  declared = program.declared_parameters()
  names = [n for n, _ in declared]
  unknown = [k for k in kwargs if k not in names]
  if unknown or len(args) + len(kwargs) != len(declared) or any(
      k in names[:len(args)] for k in kwargs):
    given = len(args) + len(kwargs)
    raise errors.FederatedADError(
        f'{program.name} takes {len(declared)} argument(s) {names}; it was '
        f'called with {given} ({len(args)} positional, keywords '
        f'{list(kwargs)}).')
  values = list(args) + [kwargs[n] for n in names[len(args):]]
  if any(isinstance(v, tff.Value) for v in tf.nest.flatten(values)):
    return  # Called inside a tff.federated_computation: TFF checks types.
  for (name, type_spec), value in zip(declared, values):
    problem = _mismatch(value, type_spec)
    if problem:
      raise errors.FederatedADError(
          f'{program.name}: argument {name!r} {problem} (expected type '
          f'{type_spec}).')


def federated_computation(*parameter_types):
  """Decorator: traces a federated program built from tff_fad primitives.

  ```
  @tff_fad.federated_computation(
      tff.FederatedType(W, tff.SERVER), tff.FederatedType(D, tff.CLIENTS))
  def loss(w, data):
    w_at_clients = tff_fad.federated_broadcast(w)
    return tff_fad.federated_mean(
        tff_fad.federated_map(client_loss, (w_at_clients, data)))
  ```

  Args:
    *parameter_types: One `tff.FederatedType` per parameter of the function.

  Returns:
    A decorator producing a `FederatedComputation`, which runs the primal on
    TFF's runtime when called and can be given to `jvp`, `vjp`, `grad`,
    `value_and_grad`.
  """
  if len(parameter_types) == 1 and callable(parameter_types[0]) and not (
      isinstance(parameter_types[0], tff.Type)):
    raise errors.FederatedADError(
        '@tff_fad.federated_computation needs the parameter types: write '
        '@tff_fad.federated_computation(tff.FederatedType(...), ...).'
    )

  def decorator(fn):
    return FederatedComputation(ir.trace(fn, parameter_types), fn)

  return decorator


# ---------------------------------------------------------------------------
# Analysis.


def resolve_wrt(program: ir.Program, wrt: Wrt) -> List[int]:
  """Parameter positions named by `wrt`, validated for differentiability."""
  items = list(wrt) if isinstance(wrt, (list, tuple)) else [wrt]
  if not items:
    raise errors.FederatedADError('wrt is empty: name at least one argument.')
  positions = []
  for item in items:
    if isinstance(item, bool) or not isinstance(item, (int, str, np.integer)):
      raise errors.FederatedADError(
          f'wrt entries must be parameter positions or names, found {item!r}.'
      )
    if isinstance(item, str):
      if item not in program.parameter_names:
        raise errors.FederatedADError(
            f'wrt={item!r} is not a parameter of {program.name}; parameters '
            f'are {program.parameter_names}.'
        )
      position = program.parameter_names.index(item)
    else:
      position = int(item)
      if not 0 <= position < len(program.parameters):
        raise errors.FederatedADError(
            f'wrt={item} is out of range: {program.name} has '
            f'{len(program.parameters)} parameter(s).'
        )
    if position in positions:
      raise errors.FederatedADError(f'wrt names argument {item!r} twice.')
    parameter = program.parameters[position]
    member = parameter.member
    if isinstance(member, tff.SequenceType) or not (
        fad_types.has_float_leaf(member)
        and not fad_types.non_float_leaves(member)
    ):
      raise errors.NotDifferentiableError(
          f'Cannot differentiate with respect to argument {parameter.name!r} '
          f'of type {parameter.type_signature}: only floating-point '
          'arguments have derivatives.'
      )
    positions.append(position)
  return positions


def activity(program: ir.Program, wrt: Sequence[int]):
  """Values that depend on `wrt` (active) and nodes the outputs need."""
  active = {program.parameters[i] for i in wrt}
  for node in program.nodes:
    if (node.primitive.propagates_derivatives
        and any(x in active for x in node.inputs)
        and fad_types.has_float_leaf(node.output.member)):
      active.add(node.output)
  needed_values = set(program.output_values())
  needed_nodes = []
  for node in reversed(program.nodes):
    if node.output in needed_values:
      needed_nodes.append(node)
      needed_values.update(node.inputs)
  needed_nodes.reverse()
  return active, needed_nodes


def prune_tangents(nodes: Sequence[ir.Node], active, outputs):
  """Forward mode computes only the tangents the `outputs` need.

  Returns `(active values whose tangent is needed, {client map node: the
  positions of its tuple output whose tangents are needed})`. An active
  value whose tangent nothing needs (e.g. local training results that only
  go to `has_aux`'s aux) is computed as a primal. A local function whose
  struct output is only read through selections computes the tangents of
  the selected members alone, so a client does not return (and the runtime
  does not move) tangents that are dropped.
  """
  needed = {v for v in tf.nest.flatten(outputs) if v in active}
  consumers = collections.defaultdict(list)
  for node in nodes:
    for x in node.inputs:
      consumers[x].append(node)
  for node in reversed(nodes):
    if node.output in needed and node.primitive.propagates_derivatives:
      needed.update(x for x in node.inputs if x in active)
  partial = {}
  outputs = set(tf.nest.flatten(outputs))
  for node in nodes:
    users = consumers[node.output]
    # Tuples only: their positions are the same in TFF and in Python.
    if (node.output in needed and node.output not in outputs
        and isinstance(node.primitive, primitives.Map) and users
        and getattr(node.output.member, 'python_container', None) in (
            tuple, list)
        and all(isinstance(u.primitive, primitives.Select)
                and isinstance(u.params['key'], int) for u in users)):
      partial[node] = frozenset(
          u.params['key'] for u in users if u.output in needed)
  return needed, partial


def _check_differentiable(nodes: Sequence[ir.Node], active, mode) -> None:
  for node in nodes:
    if not node.primitive.propagates_derivatives:
      continue
    # Forward mode (`active` pruned) differentiates a node whose output's
    # tangent is needed; one that only reads active values runs as a primal.
    if mode == 'forward' and node.output not in active:
      continue
    if not any(x in active for x in node.inputs):
      continue
    reason = node.primitive.why_not_differentiable(node, mode)
    if reason or not node.primitive.differentiable:
      raise errors.NotDifferentiableError(
          f'Cannot differentiate through `{node.describe()}`: {reason}'
      )


def _split_aux(program: ir.Program, has_aux: bool):
  """`(differentiated outputs, auxiliary outputs or None)`."""
  if not has_aux:
    return program.outputs, None
  outputs = program.outputs
  if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
    raise errors.FederatedADError(
        f'has_aux=True needs {program.name} to return a pair (output, aux); '
        f'it returns {outputs!r}.'
    )
  return outputs[0], outputs[1]


# ---------------------------------------------------------------------------
# Emission helpers.


def _derive(name: str, parameters: List[Tuple[str, tff.Type]], body
            ) -> FederatedComputation:
  """A derivative program, traced from `body(parameter values)`."""
  return FederatedComputation(ir.trace_program(name, parameters, body))


def _build(name: str, parameters: List[Tuple[str, tff.Type]], body):
  """A `tff.federated_computation` whose body gets a list of parameters."""
  if len(parameters) == 1:
    fn = lambda x: body([x])  # pylint: disable=unnecessary-lambda-assignment
    parameter_type = parameters[0][1]
  else:
    fn = lambda arg: body([arg[i] for i in range(len(parameters))])  # pylint: disable=unnecessary-lambda-assignment
    parameter_type = tff.StructType(parameters)
  fn.__name__ = name  # TFF names the traced computation after it.
  return tff.federated_computation(fn, parameter_type)


def _children(structure) -> List[Tuple[Optional[str], Any]]:
  if isinstance(structure, dict):
    return list(structure.items())
  if hasattr(structure, '_fields'):  # namedtuple
    return list(zip(structure._fields, structure))
  return [(None, x) for x in structure]


def _structure_type(structure, leaf_type):
  """A TFF type for a (nested) Python structure of `ir.Value`s."""
  if isinstance(structure, ir.Value):
    return leaf_type(structure)
  elements = [(n, _structure_type(c, leaf_type)) for n, c in
              _children(structure)]
  return tff.StructWithPythonType(elements, type(structure))


def _split_federated(tff_value, structure) -> List[Any]:
  """Flattens a TFF struct value shaped like `structure`, in tf.nest order."""

  def rebuild(value, struct):
    if isinstance(struct, ir.Value):
      return value
    children = _children(struct)
    parts = [rebuild(value[i], c) for i, (_, c) in enumerate(children)]
    if isinstance(struct, dict):
      return type(struct)(zip([n for n, _ in children], parts))
    if hasattr(struct, '_fields'):
      return type(struct)(*parts)
    return type(struct)(parts)

  return tf.nest.flatten(rebuild(tff_value, structure))


def _as_per_client(value):
  """Makes an all-equal client value `{T}@CLIENTS`, as returned per client."""
  if value.type_signature.placement is tff.CLIENTS and (
      value.type_signature.all_equal):
    return primitives.local_call(lambda x: x, [value])
  return value


def _pack_outputs(program: ir.Program, leaf_values: Dict[ir.Value, Any]):
  return tf.nest.map_structure(lambda v: leaf_values[v], program.outputs)


def _forward(program, nodes, args, tangents, active, num_directions,
             partial=None):
  """Emits the program forward; active values become `Dual`s.

  `partial` maps local-function nodes to the output positions whose
  tangents are needed (`prune_tangents`).
  """
  partial = partial or {}
  env: Dict[ir.Value, Any] = {}
  for i, (parameter, arg) in enumerate(zip(program.parameters, args)):
    if i in tangents and isinstance(tangents[i], primitives.Dual):
      env[parameter] = tangents[i]
    elif i in tangents:
      env[parameter] = primitives.Dual(primal=arg, tangent=tangents[i])
    else:
      env[parameter] = arg
  for node in nodes:
    inputs = [env[x] for x in node.inputs]
    if node.output in active:
      on = [isinstance(x, primitives.Dual) for x in inputs]
      if node in partial:
        env[node.output] = node.primitive.jvp(
            inputs, on, num_directions, needed_positions=partial[node],
            **node.params)
      else:
        env[node.output] = node.primitive.jvp(
            inputs, on, num_directions, **node.params)
    else:
      env[node.output] = primitives.apply(
          node.primitive, [primitives.primal_of(x) for x in inputs],
          node.output.type_signature, **node.params)
  return env


def _leaf_arguments(program: ir.Program, args: List[Any]) -> List[Any]:
  """TFF arguments in the declared signature -> one per leaf parameter."""
  if program.signature is None:
    return args
  leaves = []
  for arg, (_, _, structure) in zip(args, program.signature):
    if isinstance(structure, ir.Value):
      leaves.append(arg)
    else:
      leaves.extend(_split_federated(arg, structure))
  return leaves


def _emit_primal(program: ir.Program) -> tff.Computation:
  _, nodes = activity(program, [])

  def body(args):
    env = _forward(program, nodes, _leaf_arguments(program, args), {}, set(),
                   None)
    return _pack_outputs(program, env)

  return _build(program.name, program.declared_parameters(), body)


def _as_program(comp: Any, transform: str) -> ir.Program:
  if isinstance(comp, FederatedComputation):
    return comp.program
  raise errors.FederatedADError(
      f'tff_fad.{transform} needs a tff_fad program (built with '
      '@tff_fad.federated_computation, or returned by a tff_fad transform); '
      f'found {comp!r}. A tff.Computation compiled by TFF cannot be '
      'differentiated: its Python is gone.'
  )


def _check_mode(mode: str):
  if mode not in MODES:
    raise errors.FederatedADError(
        f'Unknown mode {mode!r}; choose one of {MODES} or \'auto\'.'
    )


# ---------------------------------------------------------------------------
# Forward mode.


def _check_num_directions(num_directions):
  if num_directions is not None and (
      isinstance(num_directions, bool) or not isinstance(num_directions, int)
      or num_directions <= 0):
    raise errors.FederatedADError(
        f'num_directions must be a positive int or None, found '
        f'{num_directions!r}.'
    )


def _emit_jvp_body(program, wrt, args, tangents, num_directions, has_aux,
                   tangent_seed=None):
  """Returns `(outputs, output_tangents, aux)` structures of TFF values.

  With `tangent_seed` (an int64 `[2]` server value) the tangents are the
  seeded standard normal directions instead of `tangents`.
  """
  main, aux = _split_aux(program, has_aux)
  active, nodes, partial = _forward_activity(program, wrt, main)
  _check_differentiable(nodes, active, 'forward')
  if tangent_seed is not None:
    specs = [_tensor_specs(program.parameter_types[i].member) for i in wrt]
    tangents = [
        primitives.SeededDual(primitives.emit_zip((args[i], tangent_seed)),
                              specs, position, num_directions)
        for position, i in enumerate(wrt)]
  env = _forward(program, nodes, args, dict(zip(wrt, tangents)), active,
                 num_directions, partial)
  values = tf.nest.map_structure(lambda v: primitives.primal_of(env[v]), main)
  out_tangents = tf.nest.map_structure(
      lambda v: env[v].tangent() if isinstance(env[v], primitives.Dual)
      else primitives.zero_tangent(env[v], num_directions), main)
  aux_values = None if aux is None else tf.nest.map_structure(
      lambda v: primitives.primal_of(env[v]), aux)
  return values, out_tangents, aux_values


def _tensor_specs(type_spec: tff.Type) -> Any:
  """`tf.TensorSpec`s shaped like a (non-federated) TFF type, as TF sees it."""
  if isinstance(type_spec, tff.TensorType):
    return tf.TensorSpec(type_spec.shape, type_spec.dtype)
  children = [_tensor_specs(t) for _, t in
              tff.structure.iter_elements(type_spec)]
  return tuple(children)  # Only the leaf order matters (flattened).


TANGENT_SEED_TYPE = tff.TensorType(np.int64, [2])


def jvp(comp: FederatedComputation, wrt: Wrt = 0,
        num_directions: Optional[int] = None,
        has_aux: bool = False,
        tangent_seed: bool = False) -> FederatedComputation:
  """Forward-mode derivative program of `comp`.

  Args:
    comp: A `FederatedComputation`.
    wrt: The argument(s) to differentiate: position(s) and/or name(s).
    num_directions: `None` for one tangent direction; `k` to push `k`
      directions at once (every tangent leaf gets a leading axis of size `k`).
    has_aux: If True, `comp` returns `(output, aux)` and only `output` is
      differentiated; `aux` is returned as computed.
    tangent_seed: If True (with `num_directions=k`, server-placed `wrt`),
      the program takes one `tangent_seed: int64[2]@SERVER` instead of the
      tangents: the k tangents are standard normal directions generated
      where they are needed from the seed (`tff_fad.seeded_direction`, the
      same at server and clients), so a broadcast sends `<value, seed>`, not
      k tangents, and clients regenerate one direction at a time.

  Returns:
    A tff_fad program (a `tff.Computation`)
    `(primals..., tangents...) -> (value, value_tangent)`
    (`(value, value_tangent, aux)` with `has_aux`), taking one tangent per
    `wrt` entry, in `wrt` order, each placed like its argument. Each
    broadcast/aggregation carries value and tangent in one message.
  """
  program = _as_program(comp, 'jvp')
  positions = resolve_wrt(program, wrt)
  _check_num_directions(num_directions)
  _split_aux(program, has_aux)
  parameters = list(zip(program.parameter_names, program.parameter_types))
  if tangent_seed:
    if num_directions is None:
      raise errors.FederatedADError(
          'tangent_seed=True needs num_directions=k: the seed draws k '
          'standard normal directions.')
    for i in positions:
      if program.parameters[i].placement is not tff.SERVER:
        raise errors.FederatedADError(
            f'tangent_seed=True needs server-placed wrt; argument '
            f'{program.parameter_names[i]!r} is '
            f'{program.parameter_types[i]}.')
    parameters.append((
        _fresh_name('tangent_seed', [n for n, _ in parameters]),
        tff.FederatedType(TANGENT_SEED_TYPE, tff.SERVER)))
    m = len(program.parameters)

    def seeded_body(args):
      value, tangent, aux = _emit_jvp_body(
          program, positions, args[:m], None, num_directions, has_aux,
          tangent_seed=args[m])
      return (value, tangent, aux) if has_aux else (value, tangent)

    return _derive(f'jvp_{program.name}', parameters, seeded_body)
  for i in positions:
    parameters.append((
        _fresh_name(f'{program.parameter_names[i]}_tangent',
                    [n for n, _ in parameters]),
        fad_types.federated_tangent_type(
            program.parameter_types[i], num_directions),
    ))
  m = len(program.parameters)

  def body(args):
    value, tangent, aux = _emit_jvp_body(
        program, positions, args[:m], args[m:], num_directions, has_aux)
    return (value, tangent, aux) if has_aux else (value, tangent)

  return _derive(f'jvp_{program.name}', parameters, body)


# ---------------------------------------------------------------------------
# Reverse modes.


def _emit_vjp_body(program, wrt, args, output_cotangent_leaves, mode,
                   has_aux):
  """Returns `(outputs, cotangents_in_wrt_order, aux)` as TFF values.

  `output_cotangent_leaves` maps the forward outputs' leaves (TFF values) to
  their cotangents, so `grad` can seed with ones.
  """
  main, aux = _split_aux(program, has_aux)
  active, nodes = activity(program, wrt)
  _check_differentiable(nodes, active, mode)
  backward = {n for n in nodes if n.output in active}

  env: Dict[ir.Value, Any] = dict(zip(program.parameters, args))
  residuals: Dict[ir.Node, Any] = {}
  for node in nodes:
    inputs = [env[x] for x in node.inputs]
    if node in backward:
      on = [x in active for x in node.inputs]
      env[node.output], residuals[node] = (
          node.primitive.forward_with_residuals(inputs, on, **node.params))
    else:
      env[node.output] = primitives.apply(
          node.primitive, inputs, node.output.type_signature, **node.params)

  def rematerialize(value, memo):
    """A client value recomputed from server state and client inputs."""
    if value in memo:
      return memo[value]
    node = value.producer
    if node is None or value.placement is tff.SERVER:
      result = env[value]
    elif isinstance(node.primitive, primitives.Broadcast):
      result = primitives.emit_broadcast(env[node.inputs[0]])
    else:
      result = primitives.apply(
          node.primitive, [rematerialize(x, memo) for x in node.inputs],
          node.output.type_signature, **node.params)
    memo[value] = result
    return result

  def inputs_of(node):
    if mode == 'reverse':
      return lambda: [env[x] for x in node.inputs]
    return lambda: [rematerialize(x, {}) for x in node.inputs]

  outputs = tf.nest.flatten(main)
  # Server flags that are NaN where a transposed aggregation's derivative is
  # undefined (a mean over no clients): the primal and forward mode give NaN
  # there, so reverse mode must not report a zero gradient.
  undefined: List[Any] = []
  cotangents: Dict[ir.Value, List[Any]] = {}
  for v, ct in zip(outputs, output_cotangent_leaves(
      [env[v] for v in outputs])):
    if v in active:
      cotangents.setdefault(v, []).append(ct)
  for node in reversed(nodes):
    if node not in backward or node.output not in cotangents:
      continue
    ct_out = primitives.add_all(cotangents.pop(node.output))
    on = [x in active for x in node.inputs]
    input_cts = node.primitive.transpose(
        ct_out, inputs_of(node), residuals[node], on, **node.params)
    flag = node.primitive.undefined_derivative(residuals[node])
    if flag is not None:
      undefined.append(flag)
    for x, ct in zip(node.inputs, input_cts):
      if ct is not None and x in active:
        cotangents.setdefault(x, []).append(ct)

  results = []
  for i in wrt:
    parameter = program.parameters[i]
    if parameter in cotangents:
      ct = primitives.add_all(cotangents[parameter])
    else:
      ct = primitives.zero_tangent(env[parameter], None)
    if undefined and parameter.placement is tff.SERVER:
      ct = primitives.local_call(_poison, [ct] + undefined)
    results.append(_as_per_client(ct))
  values = tf.nest.map_structure(lambda v: env[v], main)
  aux_values = None if aux is None else tf.nest.map_structure(
      lambda v: env[v], aux)
  return values, results, aux_values


def _fresh_name(name: str, taken: Sequence[str]) -> str:
  """`name`, or `name_2`, `name_3`, ... if taken (e.g. a jvp of a jvp)."""
  candidate, k = name, 1
  while candidate in taken:
    k += 1
    candidate = f'{name}_{k}'
  return candidate


def _poison(ct, *flags):
  total = tf.add_n([tf.cast(f, tf.float64) for f in flags])
  return tf.nest.map_structure(lambda t: t + tf.cast(total, t.dtype), ct)


def derivative_activity(program: ir.Program, positions: Sequence[int],
                        mode: str, has_aux: bool = False):
  """`(values whose derivative the mode's transform computes, nodes)`.

  `activity`, and in forward mode only the tangents the differentiated
  outputs need (`prune_tangents`), as `jvp` emits them.
  """
  if mode == 'forward':
    main, _ = _split_aux(program, has_aux)
    active, nodes, _ = _forward_activity(program, positions, main)
    return active, nodes
  return activity(program, positions)


def _forward_activity(program: ir.Program, positions: Sequence[int], outputs):
  """`(active, nodes, partial)` of the tangents `jvp` carries: `activity`
  pruned to those `outputs` need (`prune_tangents`). One function for `jvp`
  and `derivative_activity`, so the privacy report sees what `jvp` emits."""
  active, nodes = activity(program, positions)
  active, partial = prune_tangents(nodes, active, outputs)
  return active, nodes, partial


def check_derivative(comp: FederatedComputation, wrt: Wrt, mode: str,
                     has_aux: bool = False) -> None:
  """Raises the error the transform for `mode` would raise, if any."""
  _check_mode(mode)
  program = _as_program(comp, 'privacy_report')
  positions = resolve_wrt(program, wrt)
  active, nodes = derivative_activity(program, positions, mode, has_aux)
  _check_differentiable(nodes, active, mode)


def _single_or_tuple(items: List[Any], wrt: Wrt):
  return tuple(items) if isinstance(wrt, (list, tuple)) else items[0]


def _check_reverse_mode(mode: str, transform: str):
  _check_mode(mode)
  if mode == 'forward':
    raise errors.FederatedADError(
        f"{transform} is a reverse-mode transform: use mode='reverse' or "
        "'reverse_recompute' (or jvp for forward mode)."
    )


def vjp(comp: FederatedComputation, wrt: Wrt = 0, mode: str = 'reverse',
        has_aux: bool = False) -> tff.Computation:
  """Reverse-mode derivative program of `comp`.

  Args:
    comp: A `FederatedComputation`.
    wrt: The argument(s) to differentiate: position(s) and/or name(s).
    mode: 'reverse' or 'reverse_recompute' (see the module docstring), or
      'auto' for the one `tff_fad.choose_mode` picks.
    has_aux: If True, `comp` returns `(output, aux)`; only `output` gets a
      cotangent and `aux` is returned as computed.

  Returns:
    A `tff.Computation` `(primals..., output_cotangent) -> cotangents` (or
    `-> (cotangents, aux)` with `has_aux`). The output cotangent is placed and
    structured like the output; the result is the cotangent of the `wrt`
    argument, placed like it (a tuple in `wrt` order if `wrt` is a sequence).
  """
  _check_reverse_mode(mode, 'vjp')
  program = _as_program(comp, 'vjp')
  positions = resolve_wrt(program, wrt)
  main, _ = _split_aux(program, has_aux)
  ct_type = _structure_type(
      main, lambda v: fad_types.federated_tangent_type(v.type_signature))
  parameters = list(zip(program.parameter_names, program.parameter_types))
  parameters.append((_fresh_name('output_cotangent',
                                 [n for n, _ in parameters]), ct_type))
  m = len(program.parameters)

  def body(args):
    leaves = tf.nest.flatten(args[m])
    _, cts, aux = _emit_vjp_body(program, positions, args[:m],
                                 lambda _: leaves, mode, has_aux)
    cts = _single_or_tuple(cts, wrt)
    return (cts, aux) if has_aux else cts

  return _derive(f'vjp_{program.name}', parameters, body)


def _check_scalar_output(program: ir.Program, main, transform: str):
  if not (isinstance(main, ir.Value) and main.placement is tff.SERVER
          and isinstance(main.member, tff.TensorType)
          and fad_types.is_float_dtype(main.member.dtype)
          and tuple(main.member.shape) == ()):
    described = main.type_signature if isinstance(main, ir.Value) else main
    raise errors.FederatedADError(
        f'tff_fad.{transform} needs a program returning one floating-point '
        f'scalar at the server (e.g. float32@SERVER); {program.name} returns '
        f'{described}. Use vjp/jvp for other outputs.'
    )


def _forward_mode_gradients(program, positions, args, has_aux):
  """Gradients by pushing a basis of all wrt directions at once."""
  for i in positions:
    if program.parameters[i].placement is not tff.SERVER:
      raise errors.FederatedADError(
          f"mode='forward' cannot give the per-client gradient of argument "
          f'{program.parameter_names[i]!r} ({program.parameter_types[i]}): '
          'forward mode would need one pass per client and element. Use '
          "mode='reverse' or 'reverse_recompute', or jvp for directional "
          'derivatives.'
      )
  sizes = [fad_types.num_elements(program.parameter_types[i].member)
           for i in positions]
  total = sum(sizes)
  offsets = np.cumsum([0] + sizes)

  def basis(offset, size):
    def fn(x):
      eye = tf.eye(total)[:, offset:offset + size]
      out, start = [], 0
      for leaf in tf.nest.flatten(x):
        n = int(np.prod(leaf.shape.as_list(), dtype=np.int64))
        out.append(tf.cast(
            tf.reshape(eye[:, start:start + n], [total] + leaf.shape.as_list()),
            leaf.dtype))
        start += n
      return tf.nest.pack_sequence_as(x, out)
    return fn

  tangents = [
      primitives.local_call(basis(offsets[j], sizes[j]), [args[i]])
      for j, i in enumerate(positions)
  ]
  value, value_tangent, aux = _emit_jvp_body(
      program, positions, args, tangents, total, has_aux)

  def unpack(t, *params):
    grads = []
    for j, p in enumerate(params):
      start, flat = int(offsets[j]), []
      for leaf in tf.nest.flatten(p):
        n = int(np.prod(leaf.shape.as_list(), dtype=np.int64))
        flat.append(tf.cast(tf.reshape(t[start:start + n], leaf.shape),
                            leaf.dtype))
        start += n
      grads.append(tf.nest.pack_sequence_as(p, flat))
    return tuple(grads)

  grads = primitives.local_call(
      unpack, [value_tangent] + [args[i] for i in positions])
  return value, [grads[j] for j in range(len(positions))], aux


def _value_and_grad_body(program, positions, args, mode, has_aux):
  if mode == 'forward':
    return _forward_mode_gradients(program, positions, args, has_aux)
  return _emit_vjp_body(
      program, positions, args,
      lambda outs: [primitives.local_call(tf.ones_like, [outs[0]])], mode,
      has_aux)


def _gradient_program(comp, wrt, mode, has_aux, transform):
  _check_mode(mode)
  program = _as_program(comp, transform)
  main, _ = _split_aux(program, has_aux)
  _check_scalar_output(program, main, transform)
  return program, resolve_wrt(program, wrt)


def value_and_grad(comp: FederatedComputation, wrt: Wrt = 0,
                   mode: str = 'reverse', has_aux: bool = False
                   ) -> tff.Computation:
  """Value and gradient program of a scalar-valued `comp`.

  Args:
    comp: A `FederatedComputation` returning a float scalar at the server
      (or `(scalar, aux)` with `has_aux`).
    wrt: The argument(s) to differentiate: position(s) and/or name(s).
    mode: 'forward' (server-placed `wrt` only; one pass per element, batched),
      'reverse' or 'reverse_recompute', or 'auto': the mode whose program
      communicates least (`tff_fad.choose_mode` shows every mode's cost).
    has_aux: If True, `comp` returns `(scalar, aux)`.

  Returns:
    A `tff.Computation` `(primals...) -> (value, gradient)` (or
    `-> ((value, aux), gradient)` with `has_aux`); the gradient is placed and
    structured like its argument (a tuple in `wrt` order if `wrt` is a
    sequence).
  """
  program, positions = _gradient_program(comp, wrt, mode, has_aux,
                                         'value_and_grad')

  def body(args):
    value, grads, aux = _value_and_grad_body(program, positions, args, mode,
                                             has_aux)
    grads = _single_or_tuple(grads, wrt)
    return ((value, aux), grads) if has_aux else (value, grads)

  return _derive(f'value_and_grad_{program.name}',
                list(zip(program.parameter_names, program.parameter_types)),
                body)


def grad(comp: FederatedComputation, wrt: Wrt = 0, mode: str = 'reverse',
         has_aux: bool = False) -> tff.Computation:
  """Gradient program of a scalar-valued `comp`; see `value_and_grad`.

  Returns:
    A `tff.Computation` `(primals...) -> gradient(s)` (or
    `-> (gradient(s), aux)` with `has_aux`).
  """
  program, positions = _gradient_program(comp, wrt, mode, has_aux, 'grad')

  def body(args):
    _, grads, aux = _value_and_grad_body(program, positions, args, mode,
                                         has_aux)
    grads = _single_or_tuple(grads, wrt)
    return (grads, aux) if has_aux else grads

  return _derive(f'grad_{program.name}',
                list(zip(program.parameter_names, program.parameter_types)),
                body)
