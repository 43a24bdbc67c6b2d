"""TFF's private modules are used through tff_fad.core.tff_internals only."""

import pathlib
import re

import tensorflow_federated as tff

from tff_fad.core import tff_internals

_PACKAGE = pathlib.Path(tff_internals.__file__).resolve().parents[1]
# How the modules that use TFF's internals import them: alias -> the name in
# tff_internals.
_ALIASES = {
    'bb': 'building_blocks',
    'intrinsic_defs': 'intrinsic_defs',
    'transformation_utils': 'transformation_utils',
    'transformations': 'transformations',
    'computation_impl': 'computation_impl',
    'tff_mergeable': 'mergeable_context',
    'cardinalities_utils': 'cardinalities_utils',
}


def test_written_for_the_installed_tff():
  assert tff.__version__ == tff_internals.WRITTEN_FOR_TFF, (
      f'TensorFlow Federated {tff.__version__} is installed; '
      f'tff_fad.core.tff_internals was written for '
      f'{tff_internals.WRITTEN_FOR_TFF}. Re-check every name in its USED '
      '(and what tff_fad.workers does with the mergeable context\'s private '
      'steps), then update WRITTEN_FOR_TFF.')
  assert not tff_internals.missing_names()


def test_only_tff_internals_imports_tffs_private_modules():
  importers = sorted(
      str(path.relative_to(_PACKAGE)) for path in _PACKAGE.rglob('*.py')
      if 'tensorflow_federated.python' in path.read_text())
  assert importers == ['core/tff_internals.py']


def test_every_private_name_used_is_listed_and_checked():
  used = {}
  for path in _PACKAGE.rglob('*.py'):
    if path.name == 'tff_internals.py':
      continue
    source = path.read_text()
    for alias, imported in _ALIASES.items():
      if not re.search(rf'^from tff_fad.core.tff_internals import {imported}'
                       rf'( as {alias})?$', source, re.M):
        continue
      for name in re.findall(rf'\b{alias}\.(\w+)', source):
        used.setdefault(imported, set()).add(name)
  # Each module's uses were found: the test does not look in the wrong place.
  assert sorted(used) == sorted(set(_ALIASES.values()))
  for imported, names in used.items():
    listed = tff_internals.USED[getattr(tff_internals, imported)]
    assert names <= set(listed), (imported, names - set(listed))
