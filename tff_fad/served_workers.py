"""Workers behind TLS fronts on this machine, for tests and benchmarks.

`ServedWorkers(n, tls_ca=..., tls_cert=..., tls_key=...)` starts n
`python -m tff_fad.local_workers serve` processes on loopback: what each
machine of a cluster runs, each TFF worker in a private network namespace
behind its front. They die with this process.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from tff_fad import runtime
from tff_fad.local_workers import check_num_workers
from tff_fad.local_workers import is_running
from tff_fad.local_workers import WorkerUnavailableError


class ServedWorkers:
  """Workers behind TLS fronts (`serve`), on this machine: for tests and
  benchmarks of what a multi-machine cluster runs.

  Each is a `python -m tff_fad.local_workers serve` process (its TFF worker
  in a private network namespace) that dies with this process.

  Attributes:
    addresses: `host:port` of each front.
    pids: The `serve` processes.
    worker_pids: Their TFF worker processes.
    worker_ports: The ports those listen on, inside their namespaces.
    log_dir: Each `serve`'s output (serve_<i>.log) and its worker's.
  """

  def __init__(self, num_workers: int, *, tls_ca: Optional[str] = None,
               tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
               insecure: bool = False, host: str = '127.0.0.1',
               log_dir: Optional[str] = None,
               ready_timeout_seconds: float = 60.0):
    check_num_workers(num_workers)
    self.log_dir = log_dir or tempfile.mkdtemp(prefix='tff_fad_served_')
    os.makedirs(self.log_dir, exist_ok=True)
    flags = (['--insecure'] if insecure else
             [f'--tls_ca={tls_ca}', f'--tls_cert={tls_cert}',
              f'--tls_key={tls_key}'])
    self._children: List[subprocess.Popen] = []
    self.addresses, self.pids, self.worker_pids, self.worker_ports = (
        [], [], [], [])
    ready_files = []
    try:
      for i in range(num_workers):
        ready_files.append(os.path.join(self.log_dir, f'serve_{i}.json'))
        with open(os.path.join(self.log_dir, f'serve_{i}.log'), 'ab') as log:
          self._children.append(runtime.popen_dying_with_parent(
              [sys.executable, '-m', 'tff_fad.local_workers', 'serve',
               f'--listen={host}:0', f'--ready_file={ready_files[-1]}',
               f'--log_dir={self.log_dir}'] + flags,
              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
      self._wait_until_ready(ready_files, ready_timeout_seconds)
    except BaseException:
      self.stop()
      raise

  def _wait_until_ready(self, ready_files, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    for i, (child, path) in enumerate(zip(self._children, ready_files)):
      while not os.path.exists(path):
        log = os.path.join(self.log_dir, f'serve_{i}.log')
        if child.poll() is not None:
          with open(log) as f:
            tail = f.read().strip().splitlines()[-1:] or ['(no output)']
          raise WorkerUnavailableError(
              f'serve #{i}', f'exited with code {child.returncode} while '
              f'starting: {tail[0]}')
        if time.monotonic() > deadline:
          raise WorkerUnavailableError(
              f'serve #{i}', f'not ready within {timeout_seconds:g} s; see '
              f'{log}.')
        time.sleep(0.05)
      with open(path) as f:
        ready = json.load(f)
      self.addresses.append(ready['address'])
      self.pids.append(ready['pid'])
      self.worker_pids.append(ready['worker_pid'])
      self.worker_ports.append(ready['worker_port'])

  def stop(self, timeout_seconds: float = 10.0) -> None:
    """Stops the fronts, whose workers stop with them. Safe to call twice."""
    runtime.interrupt_then_kill(
        [c.pid for c in self._children if c.poll() is None],
        lambda pid: not is_running(pid), timeout_seconds)
    for child in self._children:
      child.wait()
    deadline = time.monotonic() + timeout_seconds
    while (any(is_running(p) for p in self.worker_pids)
           and time.monotonic() < deadline):
      time.sleep(0.05)
    self._children = []

  def __enter__(self) -> 'ServedWorkers':
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()
