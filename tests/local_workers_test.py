"""Tests of tff_fad.local_workers: addresses, local workers, the command line."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tff_fad import local_workers
from tff_fad import served_workers
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


# ---------------------------------------------------------------------------
# serve: one worker for other machines, behind a TLS front.


@pytest.fixture(scope='module')
def certificates(tmp_path_factory):
  from tff_fad import worker_tls  # pylint: disable=g-import-not-at-top
  return worker_tls.make_certificates(
      str(tmp_path_factory.mktemp('certs')), ['127.0.0.1', 'localhost'])


def test_cli_serve_without_tls_is_refused_unless_insecure(tmp_path):
  ready = tmp_path / 'ready.json'
  result = _run_cli('serve', '--listen', '127.0.0.1:0', '--ready_file',
                    str(ready))
  assert result.returncode == 1
  assert ('serve needs --tls_ca, --tls_cert, --tls_key' in result.stderr
          and '--insecure' in result.stderr), result.stderr
  assert not ready.exists()


@pytest.mark.parametrize('flags, message', [
    (['--tls_ca={ca_cert}'], 'serve needs --tls_cert, --tls_key'),
    (['--tls_ca={ca_cert}', '--tls_cert={worker_cert}',
      '--tls_key={driver_key}'],
     "--tls_cert / --tls_key: cannot load '{worker_cert}' with "
     "'{driver_key}' (KEY_VALUES_MISMATCH)"),
    (['--tls_ca=/no/such/ca.pem', '--tls_cert={worker_cert}',
      '--tls_key={worker_key}'], "--tls_ca: no such file '/no/such/ca.pem'"),
    (['--tls_ca={worker_key}', '--tls_cert={worker_cert}',
      '--tls_key={worker_key}'], "--tls_ca: '{worker_key}' holds no PEM CA "
     'certificate'),
    (['--insecure', '--tls_ca={ca_cert}'],
     '--insecure with --tls_ca: give the TLS files or --insecure, not both'),
    (['--listen=0.0.0.0:http'], "--listen: Worker address '0.0.0.0:http' is "
     'not host:port'),
])
def test_cli_serve_names_bad_tls_settings(certificates, flags, message):
  flags = [f.format(**certificates) for f in flags]
  if not any(f.startswith('--listen') for f in flags):
    flags.append('--listen=127.0.0.1:0')
  result = _run_cli('serve', *flags)
  assert result.returncode == 1, result.stderr
  assert message.format(**certificates) in result.stderr


def test_cli_serve_insecure_serves_plaintext_from_a_private_namespace(tmp_path):
  with served_workers.ServedWorkers(1, insecure=True,
                                   log_dir=str(tmp_path)) as served:
    with open(tmp_path / 'serve_0.log') as f:
      assert 'PLAINTEXT (--insecure)' in f.read()
    # The front relays to the worker: it answers HTTP/2 as a gRPC server.
    host, port = served.addresses[0].rsplit(':', 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
      s.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + bytes(
          [0, 0, 0, 4, 0, 0, 0, 0, 0]))
      s.settimeout(10)
      assert s.recv(9)[3] == 4  # A SETTINGS frame.
    with pytest.raises(ConnectionRefusedError):
      socket.create_connection((host, served.worker_ports[0]), timeout=5)
    pids = served.pids + served.worker_pids
  assert not any(local_workers.is_running(p) for p in pids)


def test_cli_serve_warns_of_a_key_others_can_read(certificates, tmp_path):
  key = tmp_path / 'worker.key'
  key.write_bytes(open(certificates['worker_key'], 'rb').read())
  key.chmod(0o644)
  with served_workers.ServedWorkers(
      1, tls_ca=certificates['ca_cert'], tls_cert=certificates['worker_cert'],
      tls_key=str(key), log_dir=str(tmp_path)):
    log = (tmp_path / 'serve_0.log').read_text()
  assert log.count(f'warning: --tls_key {key} is readable by other users '
                   '(mode 644)') == 1


def test_make_certs_cli_writes_private_keys_for_their_owner_only(tmp_path):
  import ssl  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, '-m', 'tff_fad.worker_tls', 'make-certs', '--out_dir',
       str(tmp_path), '--worker_hosts', 'worker-1.example,10.0.0.5'],
      capture_output=True, text=True, cwd=_REPO, check=False)
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(tmp_path)) == [
      'ca.key', 'ca.pem', 'driver.key', 'driver.pem', 'worker.key',
      'worker.pem']
  for key in ('ca.key', 'driver.key', 'worker.key'):
    assert os.stat(tmp_path / key).st_mode & 0o777 == 0o600
  worker = ssl._ssl._test_decode_cert(str(tmp_path / 'worker.pem'))  # pylint: disable=protected-access
  assert worker['subjectAltName'] == (('DNS', 'worker-1.example'),
                                      ('IP Address', '10.0.0.5'))
