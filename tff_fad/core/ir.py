"""A traced federated program: the small IR that tff_fad differentiates.

`tff_fad.federated_computation` calls the user's Python function once with
symbolic `Value`s. Each `tff_fad.federated_*` primitive appends a `Node` to
the active `Program`; the program is a straight-line list of nodes in program
order (a tiny "federated jaxpr"). Emitters in `transforms.py` walk it to build
native `tff.Computation`s: the primal, its JVP, its VJP.
"""

import collections
import dataclasses
import inspect
import itertools
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
import tensorflow_federated as tff

from tff_fad.core import errors

_ids = itertools.count()
# `value[key]` is the `select` primitive. The rule table (primitives.py,
# built on this module) installs it when it loads, so this module imports
# nothing above it.
_indexing: Optional[Callable[['Value', Any], 'Value']] = None


def set_indexing(select: Callable[['Value', Any], 'Value']) -> None:
  """Makes `value[key]` call `select(value, key)` (primitives.py's)."""
  global _indexing
  _indexing = select


class Value:
  """A symbolic federated value in a program being traced.

  Only tff_fad primitives accept it. Indexing (`value[0]`, `value['name']`)
  selects a member of a structure at the value's placement.
  """

  __slots__ = ('type_signature', 'producer', 'name', '_id')

  def __init__(
      self,
      type_signature: tff.FederatedType,
      producer: Optional['Node'],
      name: str,
  ):
    self.type_signature = type_signature
    self.producer = producer
    self.name = name
    self._id = next(_ids)

  @property
  def placement(self) -> tff.framework.PlacementLiteral:
    return self.type_signature.placement

  @property
  def member(self) -> tff.Type:
    return self.type_signature.member

  def __getitem__(self, key):
    return _indexing(self, key)

  def __hash__(self):
    return self._id

  def __eq__(self, other):
    return self is other

  def __lt__(self, other):
    return self._id < other._id

  def __repr__(self):
    return f'<tff_fad value {self.name}: {self.type_signature}>'

  def __bool__(self):
    raise TypeError(
        f'{self!r} is symbolic: Python control flow cannot depend on a '
        'federated value. Use tf.cond inside a federated_map/apply function.'
    )


@dataclasses.dataclass(eq=False)
class Node:
  """One primitive application: `output = primitive(*inputs, **params)`."""

  primitive: Any  # primitives.Primitive; typed loosely to avoid a cycle.
  inputs: Tuple[Value, ...]
  params: Dict[str, Any]
  output: Optional[Value] = None

  def describe(self) -> str:
    args = ', '.join(v.name for v in self.inputs)
    return f'{self.output.name} = {self.primitive.name}({args})'


@dataclasses.dataclass(eq=False)
class Program:
  """A traced federated program.

  Attributes:
    name: The traced function's name.
    parameter_names: Names of the parameters, in order.
    parameters: The symbolic parameter values.
    nodes: Primitive applications in program order.
    outputs: A `Value`, or a (nested) tuple/list/dict of `Value`s.
    signature: The declared parameters `(name, type, structure)` when one is
      a structure of federated values (a vjp's output cotangent): its
      `structure` holds its leaf parameters (named `name.path`), which are
      what `parameters` lists. None when every parameter is federated.
  """

  name: str
  parameter_names: List[str]
  parameters: List[Value]
  nodes: List[Node]
  outputs: Any
  signature: Optional[List[Tuple[str, Any, Any]]] = None

  @property
  def parameter_types(self) -> List[tff.FederatedType]:
    return [p.type_signature for p in self.parameters]

  def declared_parameters(self) -> List[Tuple[str, Any]]:
    """`(name, type)` of each parameter as the TFF signature declares it."""
    if self.signature is None:
      return list(zip(self.parameter_names, self.parameter_types))
    return [(n, t) for n, t, _ in self.signature]

  def output_values(self) -> List[Value]:
    return tf.nest.flatten(self.outputs)

  def __str__(self):
    params = ', '.join(
        f'{n}: {p.type_signature}'
        for n, p in zip(self.parameter_names, self.parameters)
    )
    body = '\n'.join('  ' + n.describe() for n in self.nodes)
    return f'{self.name}({params}):\n{body}\n  return {self.outputs}'


class _TraceState(threading.local):

  def __init__(self):
    super().__init__()
    self.stack: List[Program] = []


_state = _TraceState()


def current_program(primitive_name: str) -> Program:
  if not _state.stack:
    raise errors.FederatedADError(
        f'tff_fad.{primitive_name} was called outside a function decorated '
        'with @tff_fad.federated_computation.'
    )
  return _state.stack[-1]


def bind(
    primitive, inputs: Sequence[Value], type_signature: tff.FederatedType,
    **params,
) -> Value:
  """Appends `primitive(*inputs, **params)` to the program being traced."""
  program = current_program(primitive.name)
  known = set(program.parameters)
  known.update(n.output for n in program.nodes)
  for value in inputs:
    if value not in known:
      raise errors.FederatedADError(
          f'{primitive.name} received {value!r}, which belongs to a different '
          'tff_fad program (a value captured from another traced function).'
      )
  node = Node(primitive=primitive, inputs=tuple(inputs), params=params)
  node.output = Value(
      type_signature, node, name=f'v{len(program.nodes)}'
  )
  program.nodes.append(node)
  return node.output


def is_tracing() -> bool:
  return bool(_state.stack)


def _as_federated_type(name: str, type_spec: Any) -> tff.FederatedType:
  try:
    type_spec = tff.types.to_type(type_spec)
  except TypeError as e:
    raise errors.FederatedADError(
        f'Parameter {name!r}: {type_spec!r} is not a TFF type ({e}).'
    ) from e
  if not isinstance(type_spec, tff.FederatedType):
    raise errors.PlacementError(
        f'Parameter {name!r} has type {type_spec}, which is not federated: '
        'give tff.FederatedType(..., tff.SERVER) or '
        'tff.FederatedType(..., tff.CLIENTS).'
    )
  return type_spec


def trace(fn: Callable[..., Any], parameter_types: Sequence[Any]) -> Program:
  """Traces `fn` with symbolic arguments of `parameter_types`."""
  signature = inspect.signature(fn)
  names = []
  for p in signature.parameters.values():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      raise errors.FederatedADError(
          f'{fn.__name__}: *args/**kwargs parameters are not supported; '
          'name each federated parameter.'
      )
    names.append(p.name)
  if len(names) != len(parameter_types):
    raise errors.FederatedADError(
        f'{fn.__name__} takes {len(names)} parameter(s) {names} but '
        f'{len(parameter_types)} type(s) were given.'
    )
  types = [_as_federated_type(n, t) for n, t in zip(names, parameter_types)]
  return trace_program(getattr(fn, '__name__', 'program'),
                       list(zip(names, types)), lambda args: fn(*args))


def _parameter_structure(name: str, type_spec: Any) -> Any:
  """A `Value`, or a Python structure of them for a struct of federated types."""
  if isinstance(type_spec, tff.FederatedType):
    return Value(type_spec, None, name=name)
  if isinstance(type_spec, tff.StructType):
    elements = list(tff.structure.iter_elements(type_spec))
    children = [
        _parameter_structure(f'{name}.{n if n else i}', t)
        for i, (n, t) in enumerate(elements)]
    container = getattr(type_spec, 'python_container', None)
    if container is None:
      container = (collections.OrderedDict if all(n for n, _ in elements)
                   else tuple)
    if issubclass(container, dict):
      return container(zip([n for n, _ in elements], children))
    if hasattr(container, '_fields'):
      return container(*children)
    return container(children)
  raise errors.FederatedADError(
      f'Parameter {name!r} has type {type_spec}, which is neither federated '
      'nor a structure of federated types.')


def trace_program(name: str, parameters: Sequence[Tuple[str, Any]],
                  body: Callable[[List[Any]], Any]) -> Program:
  """Traces `body(parameter values)` into a new `Program`.

  Transforms use it to build derivative programs, which are therefore
  programs like any other (and can be differentiated again). A parameter
  whose type is a structure of federated types reaches `body` as the same
  Python structure of values.
  """
  structures = [_parameter_structure(n, t) for n, t in parameters]
  leaves = tf.nest.flatten(structures)
  structured = any(not isinstance(x, Value) for x in structures)
  program = Program(
      name=name,
      parameter_names=[v.name for v in leaves],
      parameters=leaves,
      nodes=[],
      outputs=None,
      signature=[(n, t, x) for (n, t), x in zip(parameters, structures)]
      if structured else None,
  )
  _state.stack.append(program)
  try:
    outputs = body(structures)
  finally:
    _state.stack.pop()
  for leaf in tf.nest.flatten(outputs):
    if not isinstance(leaf, Value):
      raise errors.FederatedADError(
          f'{program.name} must return tff_fad federated values (or a '
          f'tuple/list/dict of them); found {leaf!r}.'
      )
  if not tf.nest.flatten(outputs):
    raise errors.FederatedADError(f'{program.name} returns no value.')
  program.outputs = outputs
  return program


def inline(program: Program, args: Sequence[Value]) -> Any:
  """Replays `program`'s nodes on `args` inside the program being traced."""
  env = dict(zip(program.parameters, args))
  for node in program.nodes:
    env[node.output] = bind(node.primitive, [env[x] for x in node.inputs],
                            node.output.type_signature, **node.params)
  return tf.nest.map_structure(lambda v: env[v], program.outputs)
