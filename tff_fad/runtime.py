"""Process hygiene for TFF's local C++ runtime.

TFF 0.87 runs federated computations in a C++ `worker_binary` that it starts
as a child process. Its only shutdown hook is a `__del__` that never runs at
interpreter exit, so the worker outlives Python, orphaned, and keeps the
parent's stdout/stderr open: `python train.py | tee log` then never returns
and CI jobs hang. Importing `tff_fad` registers `shutdown_local_workers` with
`atexit`; entry points may also call it explicitly, and should call
`exit_on_termination_signals()`: SIGTERM and SIGHUP otherwise end Python
without running `atexit`.
"""

import atexit
import gc
import os
import signal
import time
from typing import List, Optional

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
  for pid in pids:
    try:
      os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + timeout_seconds
  alive = list(pids)
  while alive and time.monotonic() < deadline:
    alive = [p for p in alive if not _reap(p)]
    if alive:
      time.sleep(0.05)
  for pid in alive:
    try:
      os.kill(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
      pass
  for manager in _tff_service_managers():
    manager._process = None  # pylint: disable=protected-access
    manager._stub = None  # pylint: disable=protected-access
  return len(pids)


class TerminatedBySignal(SystemExit):
  """SIGTERM or SIGHUP, turned into an exit that runs clean-up code."""

  def __init__(self, signum: int):
    super().__init__(128 + signum)  # The shell's code for death by signal.
    self.signum = signum

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name


_TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum, unused_frame):
  # A second signal must not cut the (bounded) clean-up short.
  for other in _TERMINATION_SIGNALS:
    if signal.getsignal(other) is _raise_terminated:
      signal.signal(other, signal.SIG_IGN)
  raise TerminatedBySignal(signum)


def exit_on_termination_signals() -> None:
  """Makes SIGTERM and SIGHUP raise `TerminatedBySignal` in the main thread.

  By default they end Python at once, skipping `finally` blocks and `atexit`,
  so `kill PID`, a closed terminal or a scheduler's stop leaks TFF's worker.
  As an exception they unwind the stack and exit with code 128 + signal
  number; later ones are ignored while clean-up runs (it is bounded by
  `shutdown_local_workers`' timeout). Signals that already have a handler
  other than the default are left alone. Call from the main thread (Python
  sets handlers only there). SIGKILL cannot be caught: run under a process
  group the caller can kill.
  """
  for signum in _TERMINATION_SIGNALS:
    if signal.getsignal(signum) is signal.SIG_DFL:
      signal.signal(signum, _raise_terminated)


atexit.register(_at_exit)
