"""A run's output directory: one run at a time, results never lost or mixed.

The rules (README, "Resuming after a crash"):

* A run holds an exclusive lock on its directory (`lock`) from before it
  reads anything there until it has written its summary. A second run fails
  at once, naming the holder; the lock of a run that died is taken over.
* `prepare` decides what an existing directory means. A run resumes only
  from a verified save of a run with the same flags (`run_flags.json`, which
  must exist) whose `metrics.csv` holds every round up to that save. A run
  that would not resume refuses a directory holding another run's results,
  unless `--overwrite`, which deletes them first.
* Each save gets a manifest (size and SHA-256 of its files), written last;
  a save whose files do not match it (or that has none) is skipped, naming
  it and the save used instead, and kept aside (`damaged_program_state_N`)
  for inspection. A save cut short by a crash (marked while being written)
  is removed: TFF writes that round again.
* `write_summary` writes strict JSON: a diverged run says so.
"""

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import sys
from typing import Any, Iterator, Optional

from absl import flags

import tensorflow_federated as tff

FLAGS_FILE = 'run_flags.json'
METRICS_FILE = 'metrics.csv'
SUMMARY_FILE = 'summary.json'
STATE_DIR = 'program_state'
STATE_PREFIX = 'program_state_'
_LOCK_FILE = 'run.lock'
_MANIFEST = 'tff_fad_manifest.json'
# Everything a run writes (the plots are the binaries'): `--overwrite`
# deletes these and nothing else, so a mistyped --output_dir loses no
# unrelated files.
_OUTPUTS = (FLAGS_FILE, METRICS_FILE, SUMMARY_FILE, STATE_DIR, 'tensorboard',
            'accuracy_and_lr.png', 'accuracy.png')
# Flags that may change when a run is resumed: they do not change what is
# computed (only how, where, or for how long).
RESUMABLE_CHANGES = frozenset({
    'rounds', 'workers', 'allow_remote_workers', 'worker_tls_ca',
    'worker_tls_cert', 'worker_tls_key', 'save_every', 'eval_every',
    'output_dir', 'task_cache_dir', 'overwrite'})
# Flags that do not change a finished run's results (its rounds and
# evaluations): a run finished with only these changed is the same run.
_NOT_RESULTS = RESUMABLE_CHANGES - {'rounds', 'eval_every'}
# A save cut short inside TFF's `write_saved_model` leaves its temporary dir.
_TEMP_SAVE = re.compile(re.escape(STATE_PREFIX) + r'\d+_temp\d+$')

# The problem of a save whose writing was cut short: it never was a save.
_CUT_SHORT = 'it was cut short (no manifest yet)'

_locked_dirs = set()


class RunDirError(ValueError):
  """The output directory cannot be used as asked; says why and what to do."""


# ---------------------------------------------------------------------------
# The lock.


def _lock_holder(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  return os.read(fd, 4096).decode(errors='replace').strip()


@contextlib.contextmanager
def lock(output_dir: str) -> Iterator[None]:
  """Holds `output_dir` exclusively (created if missing) for the block.

  `fcntl.flock` on `<output_dir>/run.lock`, which also records the holder's
  pid and command for the message of a run that finds it taken. The kernel
  releases the lock of a process that dies, so a lock left by a killed run is
  free; it is taken over with a note naming that run.

  Raises:
    RunDirError: If another process holds it, naming its pid and command.
  """
  os.makedirs(output_dir, exist_ok=True)
  key = os.path.realpath(output_dir)
  fd = os.open(os.path.join(output_dir, _LOCK_FILE), os.O_RDWR | os.O_CREAT,
               0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _lock_holder(fd) or 'starting up'
      raise RunDirError(
          f'--output_dir={output_dir} is in use by another run ({holder}). '
          'Wait for it to end, or use another --output_dir.') from None
    left = _lock_holder(fd)
    if left:  # A run that released its lock would have emptied the file.
      print(f'note: taking over the lock of {output_dir} from a run that '
            f'ended without releasing it ({left}).', file=sys.stderr,
            flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()}: {shlex.join(sys.orig_argv)}\n'.encode(),
              0)
    _locked_dirs.add(key)
    try:
      yield
    finally:
      _locked_dirs.discard(key)
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # Releases the lock.


# ---------------------------------------------------------------------------
# Saves.


def _state_dir(output_dir: str) -> str:
  return os.path.join(output_dir, STATE_DIR)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _saving_marker(save_dir: str) -> str:
  """The file that exists while the save in `save_dir` is being written."""
  return os.path.join(os.path.dirname(save_dir),
                      '.saving_' + os.path.basename(save_dir))


def _write_manifest(save_dir: str) -> None:
  files = {}
  for parent, _, names in os.walk(save_dir):
    for name in names:
      path = os.path.join(parent, name)
      with open(path, 'rb') as f:
        os.fsync(f.fileno())  # On disk before the manifest vouches for it.
      files[os.path.relpath(path, save_dir)] = [os.path.getsize(path),
                                                _sha256(path)]
  _write_atomically(os.path.join(save_dir, _MANIFEST),
                    json.dumps(files, indent=1, sort_keys=True))


def save_problem(save_dir: str) -> Optional[str]:
  """Why the save in `save_dir` cannot be used; None if it is intact."""
  try:
    with open(os.path.join(save_dir, _MANIFEST)) as f:
      files = json.load(f)
  except FileNotFoundError:
    if os.path.exists(_saving_marker(save_dir)):
      return _CUT_SHORT
    return 'it has no manifest (not saved by this version of tff_fad)'
  except (OSError, ValueError) as e:
    return f'its manifest is unreadable ({e})'
  for name, (size, digest) in sorted(files.items()):
    path = os.path.join(save_dir, name)
    if not os.path.isfile(path):
      return f'{name} is missing'
    if os.path.getsize(path) != size:
      return f'{name} has {os.path.getsize(path)} bytes, {size} were saved'
    if _sha256(path) != digest:
      return f'{name} differs from what was saved (SHA-256)'
  return None


def _saves(output_dir: str) -> list[tuple[int, str]]:
  """(round, directory) of every save, newest first."""
  root = _state_dir(output_dir)
  if not os.path.isdir(root):
    return []
  saves = []
  for name in os.listdir(root):
    suffix = name[len(STATE_PREFIX):]
    if name.startswith(STATE_PREFIX) and suffix.isdigit():
      saves.append((int(suffix), os.path.join(root, name)))
  return sorted(saves, reverse=True)


def latest_saved_round(output_dir: str) -> Optional[int]:
  """The last round whose save in `output_dir` is intact."""
  for round_num, path in _saves(output_dir):
    if save_problem(path) is None:
      return round_num
  return None


class ProgramStateManager(tff.program.FileProgramStateManager):
  """TFF's file program-state manager with verified saves.

  Each save gets its manifest once TFF has written it. `load_latest` loads
  the newest intact save (`prepare` has set aside newer, unusable ones).
  """

  def __init__(self, output_dir: str, **kwargs):
    super().__init__(_state_dir(output_dir), prefix=STATE_PREFIX, **kwargs)
    self._output_dir = output_dir

  async def save(self, program_state, version: int) -> None:
    save_dir = os.path.join(_state_dir(self._output_dir),
                            f'{STATE_PREFIX}{version}')
    # Tells a save cut short by a crash (removed on restart) from one that
    # was never verified (kept, refused).
    with open(_saving_marker(save_dir), 'w'):
      pass
    await super().save(program_state, version)
    _write_manifest(save_dir)
    os.remove(_saving_marker(save_dir))

  async def load_latest(self, structure):
    version = latest_saved_round(self._output_dir)
    if version is None:
      return None, 0
    return await self.load(version, structure), version


# ---------------------------------------------------------------------------
# What an existing directory allows.


def _write_atomically(path: str, text: str) -> None:
  temp = f'{path}.tmp'
  with open(temp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temp, path)


def _metrics_rows(output_dir: str) -> Optional[list[list[str]]]:
  """metrics.csv's rows after the header (None: no file).

  A last line without its line end was cut short: it is returned as a
  1-field row, so it reads as damaged.
  """
  try:
    with open(os.path.join(output_dir, METRICS_FILE), newline='') as f:
      text = f.read()
  except FileNotFoundError:
    return None
  rows = list(csv.reader(io.StringIO(text)))
  if rows and not text.endswith('\n'):
    rows[-1] = [rows[-1][0]]
  return rows


def _results(output_dir: str) -> list[str]:
  """What in `output_dir` holds a run's results."""
  found = []
  rows = _metrics_rows(output_dir)
  if rows is not None and len(rows) > 1:
    found.append(METRICS_FILE)
  if _saves(output_dir):
    found.append(f'{STATE_DIR}/')
  if os.path.exists(os.path.join(output_dir, SUMMARY_FILE)):
    found.append(SUMMARY_FILE)
  return found


def _metrics_problem(output_dir: str, resumed_round: int) -> Optional[str]:
  """What metrics.csv lacks of rounds 0..resumed_round; None if nothing."""
  rows = _metrics_rows(output_dir)
  if not rows:
    return f'{METRICS_FILE} is missing or empty'
  header = rows[0]
  if 'round' not in header:
    return f'{METRICS_FILE} has no round column'
  column = header.index('round')
  count = {r: 0 for r in range(resumed_round + 1)}
  cut = []
  for row in rows[1:]:
    key = row[column] if column < len(row) else ''
    if not key.isdigit():
      continue
    if len(row) != len(header):
      cut.append(int(key))
    elif int(key) in count:
      count[int(key)] += 1
  missing = [r for r, n in count.items() if n == 0]
  twice = [r for r, n in count.items() if n > 1]
  problems = []
  if missing:
    problems.append(f'round(s) {_ranges(missing)} missing')
  if [r for r in cut if r <= resumed_round]:
    problems.append(f'round(s) {_ranges([r for r in cut if r <= resumed_round])}'
                    ' cut short')
  if twice:
    problems.append(f'round(s) {_ranges(twice)} more than once')
  return '; '.join(problems) or None


def _ranges(numbers: list[int]) -> str:
  parts, numbers = [], sorted(set(numbers))
  start = prev = numbers[0]
  for n in numbers[1:] + [None]:
    if n is not None and n == prev + 1:
      prev = n
      continue
    parts.append(str(start) if start == prev else f'{start}-{prev}')
    if n is not None:
      start = prev = n
  return ', '.join(parts)


def _clear(output_dir: str) -> list[str]:
  cleared = []
  for name in _OUTPUTS:
    path = os.path.join(output_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    else:
      continue
    cleared.append(name)
  return cleared


def prepare(output_dir: str, flag_values: dict, *, save_every: int,
            overwrite: bool, rounds: int) -> Optional[int]:
  """Readies `output_dir` (locked by `lock`) for a run; records its flags.

  Args:
    output_dir: The run's directory.
    flag_values: The flags that define the run (saved as run_flags.json).
    save_every: --save_every (0: the run will neither save nor resume).
    overwrite: --overwrite: delete the results there first.
    rounds: --rounds.

  Returns:
    The round a resumed run continues after, or None for a fresh start.

  Raises:
    RunDirError: If the directory holds results this run must not touch or
      cannot resume, saying why and what to do.
  """
  if os.path.realpath(output_dir) not in _locked_dirs:
    raise RuntimeError(f'prepare({output_dir!r}) needs run_dir.lock held.')
  flag_values = json.loads(json.dumps(flag_values))  # Tuples -> lists.
  if overwrite:
    cleared = _clear(output_dir)
    if cleared:
      print(f'--overwrite: deleted {", ".join(cleared)} in {output_dir}',
            flush=True)
    resumed = None
  else:
    resumed = _resumable_round(output_dir, flag_values, save_every, rounds)
  _write_atomically(os.path.join(output_dir, FLAGS_FILE),
                    json.dumps(flag_values, indent=2, sort_keys=True))
  return resumed


def _changed_flags(saved: dict, values: dict, ignored) -> list[str]:
  """The flags, other than `ignored`, whose values differ from a run's.

  A flag the run did not record (one added since) counts as unchanged while
  it has its default: flags are added with the old behaviour as default.
  """
  def default(name):
    return json.loads(json.dumps(flags.FLAGS[name].default))

  return sorted(
      k for k in set(saved) | set(values)
      if k not in ignored and saved.get(k) != values.get(k)
      and not (k not in saved and k in flags.FLAGS
               and values[k] == default(k)))


def _resumable_round(output_dir: str, values: dict, save_every: int,
                     rounds: int) -> Optional[int]:
  results = _results(output_dir)
  if not results:
    return None
  where = f'--output_dir={output_dir} holds the results of a run'
  fix = ('Use another --output_dir, or pass --overwrite to delete them and '
         'start over.')
  try:
    with open(os.path.join(output_dir, FLAGS_FILE)) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise RunDirError(
        f'{where} ({", ".join(results)}) but no {FLAGS_FILE}, so they cannot '
        f'be checked to come from these flags. {fix}') from None
  except ValueError as e:
    raise RunDirError(f'{where} ({", ".join(results)}) but its {FLAGS_FILE} '
                      f'is unreadable ({e}). {fix}') from None
  changed = _changed_flags(saved, values, RESUMABLE_CHANGES)
  if changed:
    raise RunDirError(f'{where} with different flags: ' + ', '.join(
        f'--{k}={saved.get(k)!r} (now {values.get(k)!r})' for k in changed) +
                      f'. {fix}')
  if save_every == 0:
    raise RunDirError(
        f'{where} with these flags, which --save_every=0 would neither resume '
        f'nor keep. Pass --save_every > 0 to resume it. {fix}')
  saves = []
  for round_num, path in _saves(output_dir):
    problem = save_problem(path)
    if problem == _CUT_SHORT:
      shutil.rmtree(path)
    else:
      saves.append((round_num, path, problem))
  state_dir = _state_dir(output_dir)
  for name in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
    if _TEMP_SAVE.match(name):
      shutil.rmtree(os.path.join(state_dir, name))
    elif name.startswith('.saving_'):
      os.remove(os.path.join(state_dir, name))
  if not saves:
    # This run (same flags), stopped before its first complete save: its
    # rows are recomputed, nothing of another run is touched.
    print(f'No complete save in {output_dir} to resume from: starting over.',
          flush=True)
    _clear(output_dir)
    return None
  unusable = []
  for round_num, path, problem in saves:
    if problem is None:
      break
    unusable.append((round_num, path, problem))
  else:
    raise RunDirError(
        f'{where}, but none of its saves in {_state_dir(output_dir)} is '
        'intact: ' + '; '.join(f'round {r}: {p}' for r, _, p in unusable) +
        f'. Restore them from a backup, or: {fix}')
  if round_num > rounds:
    raise RunDirError(
        f'{where} saved after round {round_num}, past --rounds={rounds}. Pass '
        f'--rounds >= {round_num}. {fix}')
  problem = _metrics_problem(output_dir, round_num)
  if problem:
    raise RunDirError(
        f'{where} saved after round {round_num}, but its {METRICS_FILE} does '
        f'not hold every round up to it ({problem}); resuming would lose '
        f'those rows. Restore {METRICS_FILE}, or: {fix}')
  for skipped, path, problem in unusable:
    # Out of the way of TFF, which will save this round again.
    aside = os.path.join(os.path.dirname(path),
                         'damaged_' + os.path.basename(path))
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    print(f'Skipping the save of round {skipped} ({path}: {problem}; kept as '
          f'{aside}); using the save of round {round_num}.', flush=True)
  if round_num == rounds:
    print(f'All {rounds} rounds are already trained in {output_dir} (the '
          f'state saved after round {round_num}): nothing to train; '
          'evaluating the final state. Pass --overwrite to train again, or '
          'a larger --rounds to go on.', flush=True)
  else:
    print(f'Resuming from the state saved after round {round_num} in '
          f'{_state_dir(output_dir)}', flush=True)
  return round_num


# ---------------------------------------------------------------------------
# The summary.


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return type(value)((k, _finite_or_none(v)) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  return value


def finished_summary(output_dir: str, flag_values: dict) -> Optional[dict]:
  """The summary of the run finished in `output_dir` with these flags.

  None if no run finished there, or if it ran with flags that change results
  (e.g. fewer --rounds: resuming it continues from its last save).
  """
  try:
    with open(os.path.join(output_dir, SUMMARY_FILE)) as f:
      summary = json.load(f)
  except FileNotFoundError:
    return None
  values = json.loads(json.dumps(flag_values))  # Tuples -> lists.
  if _changed_flags(summary.get('flags', {}), values, _NOT_RESULTS):
    return None
  return summary


def write_summary(output_dir: str, summary: dict,
                  history: dict[int, dict[str, float]]) -> dict:
  """Writes summary.json as strict JSON; returns what was written.

  Non-finite numbers become null, and `diverged` says whether any value of
  the summary or of `history` (round -> metrics) is not finite;
  `diverged_at_round` is the first such round of `history`.
  """
  bad_rounds = [r for r, metrics in history.items()
                if not all(math.isfinite(v) for v in metrics.values())]
  try:
    json.dumps(summary, allow_nan=False)
    non_finite = False
  except ValueError:
    non_finite = True
  clean = _finite_or_none(summary)
  diverged = bool(bad_rounds) or non_finite
  clean.update(diverged=diverged,
               diverged_at_round=min(bad_rounds) if bad_rounds else None)
  _write_atomically(os.path.join(output_dir, SUMMARY_FILE),
                    json.dumps(clean, indent=2, allow_nan=False))
  if diverged:
    at = f' at round {min(bad_rounds)}' if bad_rounds else ''
    print(f'warning: training diverged{at} (non-finite values); see '
          f'{os.path.join(output_dir, METRICS_FILE)}.', file=sys.stderr,
          flush=True)
  return clean
