"""Process hygiene for TFF's local C++ runtime.

TFF 0.87 runs federated computations in a C++ `worker_binary` that it starts
as a child process. Its only shutdown hook is a `__del__` that never runs at
interpreter exit, so the worker outlives Python, orphaned, and keeps the
parent's stdout/stderr open: `python train.py | tee log` then never returns
and CI jobs hang. Importing `tff_fad` registers `shutdown_local_workers` with
`atexit`; entry points may also call it explicitly.
"""

import atexit
import gc
import os
import signal
import time
from typing import List

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


def local_worker_pids() -> List[int]:
  """Returns the pids of TFF worker processes started by this process."""
  return [p for p in _children_of(os.getpid()) if is_tff_worker(p)]


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


atexit.register(_at_exit)
