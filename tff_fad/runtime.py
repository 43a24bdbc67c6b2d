"""Process hygiene for TFF's local C++ runtime.

TFF 0.87 runs federated computations in a C++ `worker_binary` that it starts
as a child process. Its only shutdown hook is a `__del__` that never runs at
interpreter exit, so the worker outlives Python, orphaned, and keeps the
parent's stdout/stderr open: `python train.py | tee log` then never returns
and CI jobs hang. Importing `tff_fad` registers `shutdown_local_workers` with
`atexit`; entry points may also call it explicitly, and should call
`set_up_entry_point()`: it makes SIGTERM, SIGHUP and SIGINT run that
clean-up (they otherwise end Python without it, or with a traceback), and
replaces TFF's default local context by one whose worker dies with Python
even on SIGKILL, which no clean-up code survives.
"""

import atexit
import gc
import os
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence

_WORKER_SUFFIX = os.path.join('data', 'worker_binary')


def _children_of(pid: int) -> List[int]:
  """Returns the pids of live processes whose parent is `pid` (Linux /proc)."""
  children = []
  try:
    entries = os.listdir('/proc')
  except OSError:  # Not Linux: nothing we can inspect.
    return children
  for entry in entries:
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat', 'rb') as f:
        stat = f.read().decode(errors='replace')
    except OSError:
      continue
    # The command name is parenthesised and may contain spaces; fields after
    # the closing parenthesis are: state, ppid, ...
    fields = stat[stat.rfind(')') + 2:].split()
    if len(fields) > 1 and int(fields[1]) == pid:
      children.append(int(entry))
  return children


def is_tff_worker(pid: int) -> bool:
  """Whether `pid` runs the worker_binary of a tensorflow-federated wheel."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      argv0 = f.read().split(b'\0', 1)[0].decode(errors='replace')
  except OSError:
    return False
  return os.path.normpath(argv0).endswith(_WORKER_SUFFIX)


def local_worker_pids(parent_pid: Optional[int] = None) -> List[int]:
  """Returns the pids of TFF worker processes started by `parent_pid`.

  Args:
    parent_pid: The starting process; default this one.
  """
  parent = os.getpid() if parent_pid is None else parent_pid
  return [p for p in _children_of(parent) if is_tff_worker(p)]


def _reap(pid: int) -> bool:
  """Collects `pid` if it has exited; returns True once it is gone."""
  try:
    done, _ = os.waitpid(pid, os.WNOHANG)
    return done == pid
  except ChildProcessError:
    # Already reaped elsewhere (e.g. by subprocess.Popen.wait).
    return not os.path.exists(f'/proc/{pid}')


def _tff_service_managers() -> List[object]:
  """TFF's (function-local) ServiceManager objects alive in this process."""
  return [
      obj for obj in gc.get_objects()
      if type(obj).__name__ == 'ServiceManager' and hasattr(obj, '_process')
  ]


def _at_exit() -> None:
  shutdown_local_workers()
  # ServiceManager.__del__ would otherwise run during interpreter teardown,
  # when its module globals are already None, and print a traceback.
  for manager in _tff_service_managers():
    type(manager).__del__ = lambda self: None


def interrupt_then_kill(pids: Sequence[int], gone: Callable[[int], bool],
                        timeout_seconds: float) -> List[int]:
  """SIGINT (what TFF itself sends), then SIGKILL to any of `pids` not gone.

  The one way tff_fad stops a worker: a worker that ignores SIGINT (one
  exec'd from a background job inherits that) would otherwise be waited on
  forever.

  Args:
    pids: The processes.
    gone: `pid -> True` once the process has exited (and, for a child, is
      reaped); polled every 50 ms.
    timeout_seconds: How long to wait for a graceful exit.

  Returns:
    The pids that got SIGKILL.
  """
  for pid in pids:
    try:
      os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + timeout_seconds
  alive = [p for p in pids if not gone(p)]
  while alive and time.monotonic() < deadline:
    time.sleep(0.05)
    alive = [p for p in alive if not gone(p)]
  for pid in alive:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  return alive


def shutdown_local_workers(timeout_seconds: float = 5.0) -> int:
  """Stops the TFF worker processes this process started.

  Sends SIGINT (what TFF itself sends), then SIGKILL to any worker still alive
  after `timeout_seconds`. Safe to call more than once.

  Args:
    timeout_seconds: How long to wait for a graceful exit.

  Returns:
    The number of worker processes that were stopped.
  """
  pids = local_worker_pids()
  for pid in interrupt_then_kill(pids, _reap, timeout_seconds):
    try:
      os.waitpid(pid, 0)
    except ChildProcessError:
      pass
  for manager in _tff_service_managers():
    manager._process = None  # pylint: disable=protected-access
    manager._stub = None  # pylint: disable=protected-access
  return len(pids)


# Execs argv[2:] after asking Linux to SIGKILL it when its parent dies, so a
# killed process cannot leave it behind. Linux counts the thread that forked
# as the parent, and forgets a request made after the parent died: hence the
# parent pid (argv[1]) checked after it. (Popen's preexec_fn would do the
# same but can deadlock in a process with threads, as TensorFlow's is.)
# SIGINT, TFF's stop signal, is reset to its default: a shell starts
# background jobs with SIGINT ignored, exec keeps that, and a worker that
# ignores SIGINT never stops when asked.
_EXEC_DYING_WITH_PARENT = (
    'import ctypes, os, signal, sys\n'
    'try:\n'
    '  ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG\n'
    'except (OSError, AttributeError):\n'
    '  pass\n'
    'if os.getppid() != int(sys.argv[1]):\n'
    '  sys.exit(1)\n'
    'signal.signal(signal.SIGINT, signal.SIG_DFL)\n'
    'os.execv(sys.argv[2], sys.argv[2:])\n')


def _stop(process: subprocess.Popen, timeout_seconds: float = 5.0) -> None:
  """`interrupt_then_kill` for one `Popen`, reaped by it."""
  if process.poll() is not None:
    return  # Reaped already: its pid may belong to another process now.
  interrupt_then_kill([process.pid], lambda _: process.poll() is not None,
                      timeout_seconds)
  process.wait()


def popen_dying_with_parent(argv: Sequence[str], **kwargs) -> subprocess.Popen:
  """`subprocess.Popen(argv, **kwargs)`, killed by Linux if this process dies.

  The pid is that of `argv[0]` (the shim execs it in place). The thread that
  calls this must live as long as the child should.
  """
  return subprocess.Popen(
      [sys.executable, '-c', _EXEC_DYING_WITH_PARENT, str(os.getpid())] +
      list(argv), **kwargs)


# As TFF's own local executor factory: model-sized values must fit.
GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = (
    ('grpc.max_message_length', GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_receive_message_length', GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_send_message_length', GRPC_MAX_MESSAGE_BYTES),
)


def worker_binary_path() -> str:
  """The `worker_binary` shipped in the installed tensorflow-federated."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('tensorflow_federated')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data',
                      'worker_binary')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No TFF worker binary at {path}.')
  return path


class _LocalWorker:
  """TFF's local `ServiceManager`, with the worker started dying with us."""

  def __init__(self):
    self._process = None
    self._stub = None

  def stub(self):
    import grpc  # pylint: disable=g-import-not-at-top
    import portpicker  # pylint: disable=g-import-not-at-top
    import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

    if self._stub is not None and self._stub.is_ready:
      return self._stub
    # Gone (e.g. stopped by shutdown_local_workers) or broken: start another.
    if self._process is not None and self._process.poll() is None:
      _stop(self._process)
    port = portpicker.pick_unused_port()
    # A session of its own: a terminal's Ctrl-C reaches Python only, which
    # stops the worker after its clean-up instead of losing it mid-call.
    self._process = popen_dying_with_parent(
        [worker_binary_path(), f'--port={port}',
         '--max_concurrent_computation_calls=-1'], start_new_session=True)
    self._stub = tff.framework.RemoteExecutorGrpcStub(grpc.insecure_channel(
        f'localhost:{port}', GRPC_OPTIONS))
    while not self._stub.is_ready:
      if self._process.poll() is not None:
        raise RuntimeError(f'TFF worker_binary exited with code '
                           f'{self._process.returncode} while starting.')
      time.sleep(0.05)
    return self._stub


def set_local_context() -> None:
  """Sets TFF's default local context to one whose worker dies with Python.

  The context is TFF's own (`create_sync_local_cpp_execution_context`), with
  `worker_binary` started through `popen_dying_with_parent` from the
  context's event-loop thread, which lives as long as the context.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  worker = _LocalWorker()

  def executor_stack(cardinalities):
    cardinalities = dict(cardinalities)
    # Server-only computations carry no CLIENTS cardinality; the C++
    # service requires one.
    cardinalities.setdefault(tff.CLIENTS, 0)
    executor = tff.framework.RemoteExecutor(worker.stub())
    executor.set_cardinalities(cardinalities)
    return executor

  tff.framework.set_default_context(tff.framework.SyncExecutionContext(
      executor_fn=tff.framework.ResourceManagingExecutorFactory(
          executor_stack),
      compiler_fn=tff.backends.native.desugar_and_transform_to_native,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result))


def set_up_entry_point() -> None:
  """What every entry point (`main`) calls first: no signal leaks a worker.

  `exit_on_termination_signals()` and `set_local_context()`.
  """
  exit_on_termination_signals()
  set_local_context()


class TerminatedBySignal(SystemExit):
  """SIGTERM, SIGHUP or SIGINT, turned into an exit that runs clean-up code."""

  def __init__(self, signum: int):
    super().__init__(128 + signum)  # The shell's code for death by signal.
    self.signum = signum

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name


_TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _raise_terminated(signum, unused_frame):
  # A second signal must not cut the (bounded) clean-up short.
  for other in _TERMINATION_SIGNALS:
    if signal.getsignal(other) is _raise_terminated:
      signal.signal(other, signal.SIG_IGN)
  raise TerminatedBySignal(signum)


def exit_on_termination_signals() -> None:
  """Makes SIGTERM, SIGHUP, SIGINT raise `TerminatedBySignal` (main thread).

  By default SIGTERM and SIGHUP end Python at once, skipping `finally` blocks
  and `atexit`, so `kill PID`, a closed terminal or a scheduler's stop leaks
  TFF's worker; SIGINT (Ctrl-C) raises KeyboardInterrupt, a traceback that
  callers do not report as a stop. As `TerminatedBySignal` they unwind the
  stack and exit with code 128 + signal number; later ones are ignored while
  clean-up runs (it is bounded by `shutdown_local_workers`' timeout).
  Signals that already have a handler other than Python's default are left
  alone (e.g. SIGINT ignored in a background job). Call from the main thread
  (Python sets handlers only there). SIGKILL cannot be caught:
  `set_local_context` covers it.
  """
  for signum in _TERMINATION_SIGNALS:
    if signal.getsignal(signum) in (signal.SIG_DFL,
                                    signal.default_int_handler):
      signal.signal(signum, _raise_terminated)


atexit.register(_at_exit)
