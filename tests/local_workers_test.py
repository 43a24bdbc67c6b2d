"""Tests of tff_fad.local_workers: addresses, local workers, the command line."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tff_fad import local_workers
from tff_fad import runtime

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



# ---------------------------------------------------------------------------
# Addresses.


@pytest.mark.parametrize('spec, expected', [
    ('localhost:8000', ['localhost:8000']),
    ('127.0.0.1:8000, 127.0.0.1:8001', ['127.0.0.1:8000', '127.0.0.1:8001']),
    (['[::1]:9000', '127.0.0.2:9000'], ['[::1]:9000', '127.0.0.2:9000']),
])
def test_loopback_addresses_are_accepted(spec, expected):
  assert local_workers.parse_addresses(spec) == expected


@pytest.mark.parametrize('spec, message', [
    ('', 'No worker addresses'),
    ('localhost', "'localhost' is not host:port"),
    ('localhost:0', "'localhost:0' is not host:port"),
    ('localhost:http', "'localhost:http' is not host:port"),
    ('localhost:1,localhost:1', "'localhost:1' is given twice"),
    ('localhost:1,10.0.0.7:8000', "'10.0.0.7:8000' is not a loopback"),
    ('[2001:db8::1]:8000', 'is not a loopback address.*unauthenticated'),
])
def test_bad_addresses_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    local_workers.parse_addresses(spec)


def test_remote_addresses_need_an_explicit_opt_in():
  assert local_workers.parse_addresses('10.0.0.7:8000', allow_remote=True) == [
      '10.0.0.7:8000']


def test_local_workers_rejects_bad_counts():
  with pytest.raises(ValueError, match='num_workers must be a positive int'):
    local_workers.LocalWorkers(0)
  with pytest.raises(ValueError, match='1 ports given for 2 workers'):
    local_workers.LocalWorkers(2, ports=[8000])


def test_local_workers_stop_on_exit_of_the_block():
  with local_workers.LocalWorkers(2) as local:
    pids = list(local.pids)
    assert all(local_workers.is_running(p) for p in pids)
    assert set(pids) <= set(runtime.local_worker_pids())
    for address in local.addresses:
      host, port = address.rsplit(':', 1)
      socket.create_connection((host, int(port)), 5).close()
  assert not any(local_workers.is_running(p) for p in pids)


def test_local_workers_die_with_their_process(tmp_path):
  # A training run killed by SIGKILL runs no clean-up: its workers must go too.
  program = textwrap.dedent(f"""
      import sys, time
      from tff_fad import local_workers
      local = local_workers.LocalWorkers(2, log_dir={str(tmp_path)!r})
      print(' '.join(map(str, local.pids)), flush=True)
      time.sleep(600)
  """)
  child = subprocess.Popen([sys.executable, '-c', program], cwd=_REPO,
                           stdout=subprocess.PIPE, text=True)
  pids = [int(p) for p in child.stdout.readline().split()]
  assert len(pids) == 2 and all(local_workers.is_running(p) for p in pids)
  child.kill()
  child.wait()
  deadline = time.monotonic() + 30
  while any(local_workers.is_running(p) for p in pids):
    assert time.monotonic() < deadline, f'workers {pids} outlived their parent'
    time.sleep(0.1)


# ---------------------------------------------------------------------------
# The command line helper.

# Stands in for a training binary: checks it got --workers with reachable
# loopback workers, without importing TensorFlow.
_FAKE_BINARY = textwrap.dedent("""
    import socket, sys
    flag = sys.argv[-1]
    assert flag.startswith('--workers='), sys.argv
    addresses = flag[len('--workers='):].split(',')
    for address in addresses:
      host, port = address.rsplit(':', 1)
      socket.create_connection((host, int(port)), timeout=5).close()
    print('REACHED', len(addresses), 'workers:', ','.join(addresses))
    sys.exit(7)
""")


def _private_network_available():
  try:
    return subprocess.run(
        ['unshare', '--user', '--map-root-user', '--net', 'true'],
        capture_output=True, check=False).returncode == 0
  except FileNotFoundError:
    return False


def _run_cli(*args, timeout=600):
  return subprocess.run(
      [sys.executable, '-m', 'tff_fad.local_workers', *args], cwd=_REPO,
      capture_output=True, text=True, timeout=timeout,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'), check=False)


@pytest.mark.parametrize('network', [
    'shared',
    pytest.param('private', marks=pytest.mark.skipif(
        not _private_network_available(),
        reason='unprivileged user+network namespaces are not available')),
])
def test_cli_runs_a_command_on_local_workers_and_stops_them(network, tmp_path):
  extra = ['--shared_network'] if network == 'shared' else []
  result = _run_cli('run', '-n', '2', '--log_dir', str(tmp_path), *extra,
                    '--', sys.executable, '-c', _FAKE_BINARY)
  assert result.returncode == 7, result.stderr  # The command's exit code.
  assert 'REACHED 2 workers: 127.0.0.1:' in result.stdout
  where = ('private network namespace' if network == 'private'
           else 'all interfaces')
  assert where in result.stderr
  # Both workers wrote their logs there and are gone.
  logs = sorted(os.listdir(tmp_path))
  assert len(logs) == 2 and all(n.startswith('worker_') for n in logs)
  ports = [n[len('worker_'):-len('.log')] for n in logs]
  leftover = subprocess.run(['pgrep', '-f', f'worker_binary --port={ports[0]}'],
                            capture_output=True, check=False).stdout
  assert not leftover.strip()


@pytest.mark.parametrize('shared', [False, True])
def test_cli_claims_a_private_network_only_where_it_holds(shared, tmp_path):
  # An inherited variable once made `run` skip the namespace and still claim
  # it. The command prints the interfaces the workers share with it.
  if not shared and not _private_network_available():
    pytest.skip('unprivileged user+network namespaces are not available')
  inherited = {'TFF_FAD_WORKERS_PRIVATE_NETWORK': '1',
               'TFF_FAD_WORKERS_UNSHARED_PID': '1'}
  result = subprocess.run(
      [sys.executable, '-m', 'tff_fad.local_workers', 'run', '-n', '1',
       '--log_dir', str(tmp_path)] + (['--shared_network'] if shared else []) +
      ['--', sys.executable, '-c',
       'import socket; print([n for _, n in socket.if_nameindex()])'],
      cwd=_REPO, capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, **inherited))
  assert result.returncode == 0, result.stderr
  interfaces = eval(result.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used
  claimed = 'in a private network namespace' in result.stderr
  assert claimed == (interfaces == ['lo']), (interfaces, result.stderr)
  assert claimed == (not shared or interfaces == ['lo'])


def test_cli_start_requires_acknowledging_the_shared_network():
  result = _run_cli('start', '-n', '1')
  assert result.returncode == 2
  assert '--shared_network' in result.stderr


def test_cli_start_and_stop(tmp_path):
  pid_file = str(tmp_path / 'pids')
  started = _run_cli('start', '-n', '2', '--shared_network', '--pid_file',
                     pid_file, '--log_dir', str(tmp_path))
  assert started.returncode == 0, started.stderr
  addresses = local_workers.parse_addresses(started.stdout.strip())
  with open(pid_file) as f:
    pids = [int(p) for p in f.read().split()]
  assert len(addresses) == len(pids) == 2
  try:
    # Detached: they outlive the command that started them.
    assert all(local_workers.is_running(p) for p in pids)
    assert not set(pids) & set(runtime.local_worker_pids())
  finally:
    stopped = _run_cli('stop', '--pid_file', pid_file)
  assert stopped.returncode == 0, stopped.stderr
  deadline = time.monotonic() + 30
  while any(local_workers.is_running(p) for p in pids):
    assert time.monotonic() < deadline, 'workers still running after stop'
    time.sleep(0.1)


@pytest.mark.parametrize('command, message', [
    ([], 'give the command to run after --'),
    (['no-such-program-tff-fad'], "cannot run 'no-such-program-tff-fad': no "
                                  'such program'),
])
def test_cli_run_names_a_missing_command(command, message):
  result = _run_cli('run', '-n', '1', '--shared_network', '--', *command)
  assert result.returncode == 1
  assert message in result.stderr
