"""README.md's install command puts a working tff_fad into a TFF environment.

The fixture builds a venv from requirements/requirements.lock the way
scripts/bootstrap.sh does (uv reuses its cache: ~10-30 s), but without the
`research` extra (matplotlib, mlxtend), i.e. a plain working TFF 0.87
environment. The tests run the command of README.md's section "Install into
an existing TFF environment" on a copy of the source and use the installed
package from outside the source tree.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_README_SECTION = '### Install into an existing TFF environment'
_RESEARCH_EXTRA = ('matplotlib', 'mlxtend')
# Each step (venv, lock install, build, TFF import and run) takes well under
# a minute with uv's cache; a step hung on the network fails instead.
_STEP_TIMEOUT_SECONDS = 600

pytestmark = pytest.mark.skipif(
    'TEST_SRCDIR' in os.environ,  # Set by `bazel test`.
    reason=(
        "needs the checkout's packaging files (pyproject.toml, README.md, the "
        "lock), which Bazel's runfiles lack, and uv's writable cache outside "
        'the sandbox; `make test` runs this test'))

# Run by the installed package, from a directory outside the source tree.
# The gradient is README.md's federated AD example; it prints one JSON line.
_CHECK_PROGRAM = r'''
import collections, importlib.metadata, importlib.util, json, sys
absent = [n for n in sys.argv[1:] if importlib.util.find_spec(n) is None]

import numpy as np, tensorflow as tf, tensorflow_federated as tff
import tff_fad
import tff_fad.learning

W = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.SERVER)
D = tff.FederatedType(collections.OrderedDict(
    x=tff.TensorType(np.float32, [2]), y=tff.TensorType(np.float32)),
    tff.CLIENTS)

@tff_fad.federated_computation(W, D)
def loss(w, data):
  def squared_error(w, example):
    return 0.5 * (tf.reduce_sum(w * example['x']) - example['y']) ** 2
  return tff_fad.federated_mean(tff_fad.federated_map(
      squared_error, (tff_fad.federated_broadcast(w), data)))

grad = tff_fad.grad(loss, mode='reverse')
value = grad([2., -1.], [dict(x=[1., 2.], y=1.), dict(x=[3., -4.], y=2.),
                         dict(x=[-7., 6.], y=-3.)])
try:
  tff_fad.data.load_raw_digits('mnist')
  mnist_error = None
except ImportError as e:
  mnist_error = str(e)
print(json.dumps(dict(
    absent=absent,
    tff_fad_file=tff_fad.__file__,
    grad=[float(v) for v in value],
    round_trips=tff_fad.communication_cost(grad, num_clients=3).round_trips,
    sklearn_digits=tff_fad.data.load_raw_digits('sklearn')[0].shape[0],
    mnist_error=mnist_error,
    requires=importlib.metadata.requires('tff_fad'),
)))
'''


def _run(argv, cwd, timeout=_STEP_TIMEOUT_SECONDS):
  """Runs `argv`; returns `(stdout, stderr)`, or fails with its output."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             PIP_DISABLE_PIP_VERSION_CHECK='1')
  # The test's own environment must not leak into the new venv.
  for name in ('PYTHONPATH', 'VIRTUAL_ENV'):
    env.pop(name, None)
  # A session of its own, so a timeout also ends its children (a TFF
  # worker_binary, pip's build backend).
  child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
  try:
    stdout, stderr = child.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    stdout, stderr = child.communicate()
    pytest.fail(f'timed out after {timeout} s: {shlex.join(argv)}\n'
                f'{stderr[-3000:]}')
  assert child.returncode == 0, (
      f'exit code {child.returncode}: {shlex.join(argv)}\n'
      f'{stdout[-2000:]}\n{stderr[-3000:]}')
  return stdout, stderr


def _readme_install_command():
  """The one command of README.md's install section, as an argv."""
  readme = (_REPO / 'README.md').read_text()
  assert _README_SECTION in readme, f'README.md lacks {_README_SECTION!r}'
  section = readme.split(_README_SECTION, 1)[1]
  block = re.search(r'```sh\n(.*?)```', section, re.DOTALL)
  assert block, f'no ```sh block after {_README_SECTION!r} in README.md'
  lines = [line for line in block.group(1).splitlines()
           if line.strip() and not line.lstrip().startswith('#')]
  assert len(lines) == 1, f'expected one command, got {lines}'
  return shlex.split(lines[0])


@pytest.fixture(scope='module')
def uv():
  # scripts/bootstrap.sh installs uv into the project's venv.
  path = shutil.which('uv', path=str(pathlib.Path(sys.executable).parent))
  if path is None:
    pytest.skip(f'uv is not installed next to {sys.executable} '
                '(scripts/bootstrap.sh installs it)')
  return path


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A copy of what the package is built from (the checkout stays clean:
  building writes build/ and *.egg-info next to pyproject.toml)."""
  src = tmp_path_factory.mktemp('source')
  for name in ('pyproject.toml', 'setup.py', 'README.md'):
    shutil.copy2(_REPO / name, src / name)
  shutil.copytree(_REPO / 'tff_fad', src / 'tff_fad',
                  ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  return src


@pytest.fixture(scope='module')
def tff_env(tmp_path_factory, uv):
  """A new venv holding the lock minus the research extra; removed after."""
  root = tmp_path_factory.mktemp('tff_env')
  venv = root / 'venv'
  lock = (_REPO / 'requirements' / 'requirements.lock').read_text()
  kept = [line for line in lock.splitlines()
          if not line.startswith(tuple(f'{n}==' for n in _RESEARCH_EXTRA))]
  assert len(lock.splitlines()) - len(kept) == len(_RESEARCH_EXTRA), (
      f'expected one pin each of {_RESEARCH_EXTRA} in the lock')
  (root / 'tff.lock').write_text('\n'.join(kept) + '\n')
  try:
    # As scripts/bootstrap.sh: a stdlib venv (it has pip, which the README's
    # command uses), then `uv pip sync` of the lock (already resolved with
    # the jax/jaxlib override).
    _run([sys.executable, '-m', 'venv', str(venv)], cwd=root)
    _run([uv, 'pip', 'sync', '--quiet', '--python', str(venv / 'bin/python'),
          str(root / 'tff.lock')], cwd=root)
    yield venv
  finally:
    shutil.rmtree(root, ignore_errors=True)  # ~2 GB, mostly hard links.


def test_readme_command_installs_a_working_tff_fad(tff_env, source,
                                                   tmp_path):
  argv = _readme_install_command()
  assert argv[:2] == ['pip', 'install'], argv
  python = str(tff_env / 'bin' / 'python')
  _run([python, '-m', *argv], cwd=source)

  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  out, _ = _run([python, '-c', _CHECK_PROGRAM, *_RESEARCH_EXTRA],
                cwd=outside)
  result = json.loads(out.strip().splitlines()[-1])

  # The environment lacks the research extra, so importing tff_fad and
  # tff_fad.learning and running the gradient proves they do without it.
  assert result['absent'] == list(_RESEARCH_EXTRA)
  installed = pathlib.Path(result['tff_fad_file'])
  assert installed.is_relative_to(tff_env) and (
      'site-packages' in installed.parts), installed
  assert result['grad'] == pytest.approx([47.333, -45.333], abs=1e-3)
  assert result['round_trips'] == 2  # reverse mode: one extra round trip.
  assert result['sklearn_digits'] == 1797  # Needs no extra.
  assert "pip install 'tff_fad[research]'" in result['mnist_error']
  # The research packages are an extra, not requirements of the library.
  requires = result['requires']
  assert 'mlxtend==0.23.4; extra == "research"' in requires, requires
  assert 'matplotlib; extra == "research"' in requires, requires
  assert not [r for r in requires if r.startswith(_RESEARCH_EXTRA)
              and 'extra ==' not in r], requires


def test_uv_applies_the_pyproject_jax_override(tff_env, source, uv):
  # Without [tool.uv] override-dependencies, TFF 0.87.0's jax/jaxlib==0.4.14
  # (not on PyPI) makes this unresolvable; with it, the installed 0.4.13
  # satisfies TFF and only the research extra is missing.
  # uv prints its plan on stderr.
  _, out = _run([uv, 'pip', 'install', '--dry-run', '--python',
                 str(tff_env / 'bin' / 'python'), '.[research]'], cwd=source)
  assert re.search(r'^ \+ mlxtend==0\.23\.4$', out, re.MULTILINE), out
  assert re.search(r'^ \+ matplotlib==', out, re.MULTILINE), out
  assert not re.search(r'^ [-+] jax', out, re.MULTILINE), out


def test_pyproject_override_matches_the_lock_override():
  # The lock is compiled with requirements/overrides.txt; `uv pip install .`
  # uses pyproject.toml's copy. They must not drift apart.
  pyproject = tomllib.loads((_REPO / 'pyproject.toml').read_text())
  overrides = [
      line.strip()
      for line in (_REPO / 'requirements' / 'overrides.txt').read_text()
      .splitlines() if line.strip() and not line.lstrip().startswith('#')]
  assert sorted(pyproject['tool']['uv']['override-dependencies']) == sorted(
      overrides)
