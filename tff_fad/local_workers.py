r"""Local TFF worker services: start, find, stop; and their addresses.

`tff_fad.workers` runs computations on TFF worker services (the C++
`worker_binary` shipped in the tensorflow-federated wheel). This module
starts such workers on this machine and validates worker addresses. It needs
nothing beyond the standard library (and portpicker), so its command line
answers at once, before any TensorFlow is imported:

  python -m tff_fad.local_workers run -n 2 -- python -m research.baffle.main \
      --output_dir out/baffle_2w

starts two workers in a private network namespace, runs the command with
`--workers=127.0.0.1:P1,127.0.0.1:P2` appended, and stops the workers when it
ends. `start` / `stop` keep detached workers running between commands.

Trust boundary: `worker_binary` serves unauthenticated, unencrypted gRPC and
listens on all interfaces (`[::]:port`; it has no flag to change that).
Whoever can reach its port can make it run any TensorFlow graph with the
worker's privileges and read what it computes. So `run` puts the workers (and
the command) in a new user + network namespace that has only its own
loopback interface: nothing outside can reach them. Without that isolation
(`--shared_network`, or `start`), they are reachable from the machine's
network; only use that on machines and networks you trust.
"""

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Union

import portpicker

from tff_fad import runtime

TRUST_WARNING = (
    'TFF workers serve unauthenticated gRPC on all interfaces: anyone who can '
    'reach a worker port can run code on that machine.')


class WorkerError(RuntimeError):
  """A TFF worker service failed; `address` names it."""

  def __init__(self, address: str, message: str):
    super().__init__(f'TFF worker {address}: {message}')
    self.address = address


class WorkerUnavailableError(WorkerError):
  """A TFF worker could not be reached, or stopped responding."""


class WorkerRefusedError(WorkerError):
  """A TFF worker and this driver do not trust each other (TLS), or do not
  speak the same protocol (TLS against plaintext)."""


# ---------------------------------------------------------------------------
# Addresses.


def split_host_port(address: str, *, any_port: bool = False):
  """`(host, port)` of 'host:port' or '[v6]:port'; ValueError naming it."""
  if address.startswith('['):  # [v6]:port
    host, sep, port = address[1:].partition(']:')
  else:
    host, sep, port = address.rpartition(':')
  lowest = 0 if any_port else 1
  if (not sep or not host or not port.isdigit()
      or not lowest <= int(port) < 65536):
    raise ValueError(f'Worker address {address!r} is not host:port (e.g. '
                     "'localhost:8000' or '[::1]:8000').")
  return host, int(port)


def is_loopback(host: str) -> bool:
  """Whether every address `host` resolves to is a loopback address."""
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    pass
  try:
    infos = socket.getaddrinfo(host, None)
  except socket.gaierror:
    return False
  return bool(infos) and all(
      ipaddress.ip_address(info[4][0].split('%')[0]).is_loopback
      for info in infos)


def parse_addresses(spec: Union[str, Sequence[str]], *,
                    allow_remote: bool = False) -> List[str]:
  """Validates worker addresses given as 'host:port,host:port' or a list.

  Args:
    spec: Comma-separated string or sequence of `host:port`.
    allow_remote: Accept addresses that are not loopback. Only do this for
      workers on machines and networks you trust (see the module docstring).

  Returns:
    The addresses, in order.

  Raises:
    ValueError: For an empty list, a malformed or repeated address, or a
      non-loopback address without `allow_remote`.
  """
  items = spec.split(',') if isinstance(spec, str) else list(spec)
  addresses = [item.strip() for item in items if item.strip()]
  if not addresses:
    raise ValueError('No worker addresses given (expected host:port,...).')
  seen = set()
  for address in addresses:
    host, _ = split_host_port(address)
    if address in seen:
      raise ValueError(f'Worker address {address!r} is given twice.')
    seen.add(address)
    if not allow_remote and not is_loopback(host):
      raise ValueError(
          f'Worker address {address!r} is not a loopback address. '
          f'{TRUST_WARNING} Connect with TLS to workers behind `python -m '
          'tff_fad.local_workers serve` (tls=WorkerTls(...), or '
          '--worker_tls_ca, --worker_tls_cert, --worker_tls_key), or allow '
          'plaintext explicitly (allow_remote=True, or '
          '--allow_remote_workers) only on a network you trust.')
  return addresses


# ---------------------------------------------------------------------------
# Local workers.


worker_binary_path = runtime.worker_binary_path


# Starts argv[2:] in a new session, logging to argv[1], prints its pid and
# exits: the worker is nobody's child here, so no clean-up at exit stops it.
_START_DETACHED = (
    'import subprocess, sys\n'
    'with open(sys.argv[1], "ab") as log:\n'
    '  print(subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL,\n'
    '      stdout=log, stderr=subprocess.STDOUT, start_new_session=True).pid)\n')


def is_running(pid: int) -> bool:
  """Whether `pid` is a live process (not gone, not a zombie; Linux /proc)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (FileNotFoundError, IndexError):
    return False


def check_num_workers(num_workers) -> None:
  """ValueError unless `num_workers` is a positive int."""
  if not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f'num_workers must be a positive int, got {num_workers!r}.')


class LocalWorkers:
  """TFF worker services started on this machine, on free ports.

  The workers' output goes to `log_dir` (never to this process's stdout,
  which an orphaned worker would keep open). Unless `detach=True`, they are
  killed if this process dies, and stopped by `stop()`, on leaving a `with`
  block, or at exit. Detached workers run until stopped by pid.

  Remember that each worker listens on all interfaces (see the module
  docstring); `addresses` are loopback addresses.

  Attributes:
    addresses: `127.0.0.1:port` of each worker.
    pids: Their process ids.
    log_dir: Where their output goes.
  """

  def __init__(self, num_workers: int, *, ports: Optional[Sequence[int]] = None,
               log_dir: Optional[str] = None, detach: bool = False,
               ready_timeout_seconds: float = 60.0):
    check_num_workers(num_workers)
    if ports is not None and len(ports) != num_workers:
      raise ValueError(f'{len(ports)} ports given for {num_workers} workers.')
    ports = list(ports) if ports else [portpicker.pick_unused_port()
                                       for _ in range(num_workers)]
    self.log_dir = log_dir or tempfile.mkdtemp(prefix='tff_fad_workers_')
    os.makedirs(self.log_dir, exist_ok=True)
    self.addresses = [f'127.0.0.1:{p}' for p in ports]
    self.pids: List[int] = []
    self._children: List[subprocess.Popen] = []
    binary = worker_binary_path()
    try:
      for port in ports:
        log_path = os.path.join(self.log_dir, f'worker_{port}.log')
        argv = [binary, f'--port={port}']
        if detach:
          launched = subprocess.run(
              [sys.executable, '-c', _START_DETACHED, log_path] + argv,
              capture_output=True, text=True, check=True)
          self.pids.append(int(launched.stdout))
        else:
          with open(log_path, 'ab') as log:
            child = runtime.popen_dying_with_parent(
                argv, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
          self._children.append(child)
          self.pids.append(child.pid)
      self._wait_until_ready(ready_timeout_seconds)
    except BaseException:
      self.stop()
      raise

  def _wait_until_ready(self, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    for address, pid in zip(self.addresses, self.pids):
      host, port = split_host_port(address)
      while True:
        for child in self._children:
          child.poll()  # Reap, so an exited child reads as not running.
        if not is_running(pid):
          raise WorkerUnavailableError(
              address, f'exited while starting; see {self.log_dir}.')
        try:
          with socket.create_connection((host, port), timeout=1.0):
            break
        except OSError:
          if time.monotonic() > deadline:
            raise WorkerUnavailableError(
                address, f'did not start listening within {timeout_seconds:g} '
                f's; see {self.log_dir}.') from None
          time.sleep(0.1)

  def stop(self, timeout_seconds: float = 10.0) -> None:
    """Stops the workers (SIGINT, then SIGKILL). Safe to call twice."""
    stop_pids(self.pids, timeout_seconds)
    for child in self._children:
      if child.poll() is None:  # Not yet exec'd into the worker binary.
        child.kill()
      child.wait()
    self._children = []
    self.pids = []

  def __enter__(self) -> 'LocalWorkers':
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()


def stop_pids(pids: Sequence[int], timeout_seconds: float = 10.0) -> int:
  """Stops the TFF workers among `pids` (SIGINT, then SIGKILL).

  Pids that are not (or no longer) TFF workers are left alone.

  Returns:
    How many workers were signalled.
  """
  mine = [p for p in pids if runtime.is_tff_worker(p) and is_running(p)]
  killed = runtime.interrupt_then_kill(
      mine, lambda pid: not is_running(pid), timeout_seconds)
  # Not necessarily our children (a detached `start`): wait for them to
  # leave /proc rather than reap them.
  deadline = time.monotonic() + timeout_seconds
  while any(is_running(p) for p in killed) and time.monotonic() < deadline:
    time.sleep(0.05)
  return len(mine)


# ---------------------------------------------------------------------------
# Command line: python -m tff_fad.local_workers run -n 2 -- COMMAND ...

# Set to its pid by the process that re-executes itself under `unshare`
# (which keeps the pid): the new process knows it was re-executed, so it does
# not loop; an inherited value names another pid and means nothing.
_REEXECUTED_ENV = 'TFF_FAD_WORKERS_UNSHARED_PID'
_IFF_UP = 0x1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914


def _bring_up_loopback() -> None:
  """`ip link set lo up`, without needing the ip tool."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack('16sH', b'lo', 0)
    flags = struct.unpack('16sH', fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack('16sH', b'lo', flags | _IFF_UP))


def in_private_network() -> bool:
  """Whether this process's network has no interface but loopback.

  Then nothing outside can reach a worker, whatever it listens on. This is
  what makes the workers private, checked rather than assumed.
  """
  return [name for _, name in socket.if_nameindex()] == ['lo']


def _enter_private_network(argv: List[str], what: str, without_it: str,
                           **extra_env: str) -> None:
  """Re-executes this command in a new user + network namespace.

  Inside, only a loopback interface exists: the workers (and the command)
  are reachable by nothing outside, whatever interfaces they listen on.
  Inheritable file descriptors stay open across the re-execution (sockets
  keep the namespace they were opened in). Where no namespace can be made,
  exits saying `what` cannot start, why, and `without_it`.
  """
  command = ['unshare', '--user', '--map-root-user', '--net', '--',
             sys.executable, '-m', 'tff_fad.local_workers'] + argv
  env = dict(os.environ, **{_REEXECUTED_ENV: str(os.getpid())}, **extra_env)
  try:
    probe = subprocess.run(['unshare', '--user', '--map-root-user', '--net',
                            'true'], capture_output=True, text=True,
                           check=False)
  except FileNotFoundError:
    probe = None
  if probe is None or probe.returncode != 0:
    reason = ('the unshare tool (util-linux) is missing' if probe is None
              else probe.stderr.strip() or f'exit code {probe.returncode}')
    sys.exit(f'error: cannot start {what} in a private network namespace '
             f'({reason}). {without_it}')
  os.execvpe('unshare', command, env)


def _run(args) -> int:
  if not args.command:
    sys.exit('error: give the command to run after --, e.g. `python -m '
             'tff_fad.local_workers run -n 2 -- python -m research.baffle.main '
             '--output_dir out/b`.')
  with LocalWorkers(args.num_workers, log_dir=args.log_dir) as local:
    command = args.command + [f'--workers={",".join(local.addresses)}']
    where = ('a private network namespace (only a loopback interface)'
             if in_private_network() else
             "this machine's network (all interfaces)")
    print(f'tff_fad.local_workers: {args.num_workers} worker(s) at '
          f'{",".join(local.addresses)} in {where}; logs in {local.log_dir}',
          file=sys.stderr, flush=True)
    try:
      child = subprocess.Popen(command)
    except FileNotFoundError:
      sys.exit(f'error: cannot run {command[0]!r}: no such program.')
    try:
      return child.wait()
    except KeyboardInterrupt:
      child.send_signal(signal.SIGINT)
      return child.wait()


# The listening socket `serve` opened on this machine's network, handed to
# its re-execution inside the private network namespace.
_LISTEN_FD_ENV = 'TFF_FAD_WORKER_LISTEN_FD'


def _listen_host_port(address: str):
  try:
    return split_host_port(address, any_port=True)
  except ValueError as e:
    sys.exit(f'error: --listen: {e}')


def _listen(host: str, port: int) -> socket.socket:
  try:
    family = (socket.AF_INET6 if ipaddress.ip_address(host).version == 6
              else socket.AF_INET)
  except ValueError:  # A host name.
    family = socket.AF_INET
  return socket.create_server((host, port), family=family, backlog=128)


def _serve_checked_args(args, reexecuted: bool):
  """The TLS context of `serve`'s flags, or None with --insecure; or exits."""
  given = [f for f, v in (('--tls_ca', args.tls_ca), ('--tls_cert',
                          args.tls_cert), ('--tls_key', args.tls_key)) if v]
  if args.insecure:
    if given:
      sys.exit(f'error: --insecure with {", ".join(given)}: give the TLS '
               'files or --insecure, not both.')
    return None
  if len(given) != 3:
    missing = sorted({'--tls_ca', '--tls_cert', '--tls_key'} - set(given))
    sys.exit(
        f'error: serve needs {", ".join(missing)}: a worker for other '
        'machines accepts only drivers presenting a certificate signed by '
        '--tls_ca (`python -m tff_fad.worker_tls make-certs` makes a test '
        f'CA). Without TLS, {TRUST_WARNING} To serve plaintext anyway, on '
        'a network you trust, pass --insecure.')
  from tff_fad import worker_tls  # pylint: disable=g-import-not-at-top
  try:
    context = worker_tls.server_ssl_context(args.tls_ca, args.tls_cert,
                                            args.tls_key)
  except worker_tls.TlsSettingsError as e:
    sys.exit(f'error: {e}')
  mode = os.stat(args.tls_key).st_mode & 0o777
  if mode & 0o077 and not reexecuted:  # Said once, before re-executing.
    print(f'warning: --tls_key {args.tls_key} is readable by other users '
          f'(mode {mode:o}): whoever reads it can pose as this worker. '
          f'`chmod 600 {args.tls_key}`.', file=sys.stderr, flush=True)
  return context


def _serve(args, argv: List[str], reexecuted: bool) -> int:
  """A worker for other machines: TLS front outside, worker inside."""
  host, port = _listen_host_port(args.listen)
  context = _serve_checked_args(args, reexecuted)
  inherited = os.environ.pop(_LISTEN_FD_ENV, None)
  if not reexecuted:
    try:
      listening = _listen(host, port)
    except OSError as e:
      sys.exit(f'error: --listen {args.listen}: cannot listen there ({e}).')
    os.set_inheritable(listening.fileno(), True)
    _enter_private_network(
        argv, 'the worker',
        'Outside one, its plaintext port would be reachable on every '
        'interface of this machine, past the TLS front. Allow unprivileged '
        'user namespaces (e.g. sysctl kernel.unprivileged_userns_clone=1, or '
        'on Ubuntu 24.04 kernel.apparmor_restrict_unprivileged_userns=0).',
        **{_LISTEN_FD_ENV: str(listening.fileno())})
  if inherited is None:
    sys.exit('error: serve lost its listening socket on re-execution.')
  if not in_private_network():
    sys.exit('error: the network namespace made by unshare has interfaces '
             'other than loopback; not starting the worker.')
  import asyncio  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from tff_fad import worker_tls  # pylint: disable=g-import-not-at-top
  logging.basicConfig(format='%(asctime)s %(name)s: %(message)s',
                      level=logging.INFO, stream=sys.stderr)
  listening = socket.socket(fileno=int(inherited))
  host, port = listening.getsockname()[:2]
  address = f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
  with LocalWorkers(1, log_dir=args.log_dir) as local:
    worker_port = split_host_port(local.addresses[0])[1]

    async def serve():
      started = asyncio.Event()
      front = asyncio.create_task(worker_tls.serve_front(
          listening, worker_port, context, started=started))
      await started.wait()
      if args.ready_file:
        temporary = args.ready_file + '.tmp'
        with open(temporary, 'w') as f:
          json.dump({'address': address, 'tls': context is not None,
                     'pid': os.getpid(), 'worker_pid': local.pids[0],
                     'worker_port': worker_port, 'log_dir': local.log_dir},
                    f)
        os.replace(temporary, args.ready_file)
      who = ('TLS; only clients presenting a certificate signed by '
             f'{args.tls_ca} get in' if context is not None else
             f'PLAINTEXT (--insecure): {TRUST_WARNING}')
      print(f'tff_fad.local_workers: serving a TFF worker at {address} '
            f'({who}). The worker itself listens on 127.0.0.1:{worker_port} '
            'in a private network namespace, reachable only through this '
            f'front. Worker log in {local.log_dir}. Stop with Ctrl-C.',
            file=sys.stderr, flush=True)
      await front

    try:
      asyncio.run(serve())
    except KeyboardInterrupt:
      pass
  return 0


def _start(args) -> int:
  local = LocalWorkers(args.num_workers, log_dir=args.log_dir, detach=True)
  with open(args.pid_file, 'w') as f:
    f.write(' '.join(str(p) for p in local.pids) + '\n')
  print(','.join(local.addresses))
  print(f'tff_fad.local_workers: started {args.num_workers} worker(s) (pids in '
        f'{args.pid_file}, logs in {local.log_dir}); they listen on all '
        f'interfaces. Stop them with `python -m tff_fad.local_workers stop '
        f'--pid_file {args.pid_file}`.', file=sys.stderr)
  return 0


def _stop(args) -> int:
  try:
    with open(args.pid_file) as f:
      pids = [int(p) for p in f.read().split()]
  except FileNotFoundError:
    sys.exit(f'error: no pid file {args.pid_file}; nothing to stop.')
  stopped = stop_pids(pids)
  os.remove(args.pid_file)
  print(f'tff_fad.local_workers: stopped {stopped} worker(s).', file=sys.stderr)
  return 0


def main(argv: Optional[List[str]] = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog='python -m tff_fad.local_workers',
      description='Start local TFF worker services. ' + TRUST_WARNING)
  commands = parser.add_subparsers(dest='action', required=True)
  run = commands.add_parser(
      'run', help='start workers, run COMMAND with --workers=..., stop them')
  run.add_argument('-n', '--num_workers', type=int, default=2)
  run.add_argument('--shared_network', action='store_true',
                   help="run on this machine's network instead of a private "
                   'network namespace (workers then listen on all '
                   'interfaces)')
  run.add_argument('--log_dir', default=None)
  run.add_argument('command', nargs=argparse.REMAINDER)
  start = commands.add_parser(
      'start', help='start detached workers and print their addresses')
  start.add_argument('-n', '--num_workers', type=int, default=2)
  start.add_argument('--insecure', '--shared_network', dest='shared_network',
                     action='store_true', required=True,
                     help='required: detached workers serve plaintext on all '
                     "interfaces of this machine's network (for workers "
                     'other machines use, `serve` with TLS)')
  start.add_argument('--pid_file', default='.tff_workers.pids')
  start.add_argument('--log_dir', default=None)
  serve = commands.add_parser(
      'serve', help='serve one worker to drivers on other machines, behind '
      'a TLS front that requires a client certificate')
  serve.add_argument('--listen', required=True,
                     help='host:port the TLS front accepts on, e.g. '
                     '0.0.0.0:8000 (port 0: any free port)')
  serve.add_argument('--tls_ca', help='PEM CA certificate: drivers must '
                     'present a certificate it signed')
  serve.add_argument('--tls_cert', help="PEM certificate of this worker, for "
                     'the host name or address drivers use')
  serve.add_argument('--tls_key', help='its private key (PEM)')
  serve.add_argument('--insecure', action='store_true',
                     help='serve plaintext without TLS: anyone who can reach '
                     '--listen can run code on this machine')
  serve.add_argument('--ready_file', default=None,
                     help='write {address, tls, pid, worker_port, ...} as '
                     'JSON here once serving')
  serve.add_argument('--log_dir', default=None)
  stop = commands.add_parser('stop', help='stop workers from `start`')
  stop.add_argument('--pid_file', default='.tff_workers.pids')
  args = parser.parse_args(argv)
  if args.action in ('run', 'start') and args.num_workers < 1:
    parser.error(f'--num_workers must be >= 1, got {args.num_workers}.')
  reexecuted = os.environ.pop(_REEXECUTED_ENV, None) == str(os.getpid())
  if reexecuted:
    _bring_up_loopback()  # A new network namespace starts with it down.
  if args.action == 'serve':
    return _serve(args, argv, reexecuted)
  if args.action == 'run':
    if args.command and args.command[0] == '--':
      args.command = args.command[1:]
    if not args.shared_network and not in_private_network():
      if reexecuted:
        sys.exit('error: the network namespace made by unshare has interfaces '
                 f'other than loopback; not starting the workers. '
                 f'{TRUST_WARNING}')
      _enter_private_network(
          argv, 'the workers',
          f'{TRUST_WARNING} To start them on this machine\'s network '
          'anyway, pass --shared_network.')
    return _run(args)
  if args.action == 'start':
    return _start(args)
  return _stop(args)


if __name__ == '__main__':
  sys.exit(main())
