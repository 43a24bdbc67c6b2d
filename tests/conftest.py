"""Suite-wide pytest hooks for tff_fad's tests."""

from tff_fad import runtime


def pytest_sessionfinish(session, exitstatus):
  """Stops the TFF worker_binary this test process started.

  TFF 0.87 leaks its C++ worker when Python exits; the orphan keeps the test
  run's stdout/stderr open and can hang CI (`make test | tee log`). `import
  tff_fad` also registers this clean-up with atexit; doing it here as well
  makes the suite fail loudly if a worker cannot be stopped.
  """
  del exitstatus  # Unused.
  runtime.shutdown_local_workers()
  leftover = runtime.local_worker_pids()
  if leftover:
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if reporter is not None:
      reporter.write_line(
          f'ERROR: TFF worker_binary processes still running: {leftover}',
          red=True,
      )
    session.exitstatus = 1
