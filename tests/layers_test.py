"""The package's imports run one way: no circles, no layer importing a higher one.

Layers, lowest first: core <- aggregation <- learning, and the execution
modules (runtime, local_workers, worker_tls, stages, workers) beside them on
the core; data is a leaf. Imports inside functions count as imports.
"""

import ast
import pathlib

import pytest

_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'tff_fad'
_LAYER = {'core': 0, 'aggregation': 1, 'learning': 2, 'data': 0}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(_PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _resolve(module: str, name: str) -> str:
  """`from module import name`: the module it loads (a submodule or module)."""
  candidate = f'{module}.{name}'
  path = _PACKAGE.parent.joinpath(*candidate.split('.'))
  return candidate if path.with_suffix('.py').exists() or path.is_dir() else module


def _import_graph():
  graph = {}
  for path in _PACKAGE.rglob('*.py'):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
          'tff_fad'):
        imported |= {_resolve(node.module, a.name) for a in node.names}
      elif isinstance(node, ast.Import):
        imported |= {a.name for a in node.names
                     if a.name.startswith('tff_fad')}
    graph[_module_name(path)] = imported - {_module_name(path)}
  return graph


_GRAPH = _import_graph()


def _reachable(start):
  seen, todo = set(), [start]
  while todo:
    for nxt in _GRAPH.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_the_graph_is_read():
  assert 'tff_fad.core.primitives' in _GRAPH['tff_fad.core.transforms']
  assert 'tff_fad.core.transforms' in _GRAPH['tff_fad.core.modes']


# The top-level package loads its names lazily; its own imports are not edges
# that a module follows at import time.
@pytest.mark.parametrize('module', sorted(m for m in _GRAPH if m != 'tff_fad'))
def test_no_import_circle(module):
  circle = [other for other in _GRAPH[module]
            if other != 'tff_fad' and module in _reachable(other)]
  assert not circle, f'{module} <-> {circle}'


@pytest.mark.parametrize('module', sorted(_GRAPH))
def test_no_layer_imports_a_higher_one(module):
  parts = module.split('.')
  if len(parts) < 2 or parts[1] not in _LAYER:
    return
  for other in _GRAPH[module]:
    other_parts = other.split('.')
    if len(other_parts) > 1 and other_parts[1] in _LAYER:
      assert _LAYER[other_parts[1]] <= _LAYER[parts[1]], (module, other)
    else:  # The package itself or the execution modules: above the layers.
      assert other in ('tff_fad',) and parts[1] != 'core', (module, other)
