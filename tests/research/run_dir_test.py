"""An output directory's results are never lost, mixed or resumed unchecked.

Most tests start from a copy of one finished run (hypergradient FedAvg,
3 rounds, a save after every round), damage or reuse it as a user might, and
run the binary in this process.
"""

import asyncio
import json
import os
import shutil

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from research import experiment
from research import run_dir
from research.hypergradient_fedavg import main as hypergradient_main

FLAGS = flags.FLAGS
# Every flag whose default a binary sets is given (both binaries may be
# imported in this process; the last import would decide the defaults).
_FLAGS = dict(rounds=3, save_every=1, eval_every=2, num_clients=6,
              clients_per_round=2, batch_size=32, seed=1,
              dirichlet_alpha='0.5', client_lr=0.05, dp_clip=1.0)


@pytest.fixture(autouse=True, scope='module')
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(['run_dir_test'])


def _run(output_dir, **changes):
  with flagsaver.flagsaver(output_dir=str(output_dir),
                           **{**_FLAGS, **changes}):
    return hypergradient_main.run()


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, parsed_flags):
  del parsed_flags  # Only needed first.
  output_dir = tmp_path_factory.mktemp('finished') / 'run'
  _run(output_dir)
  return output_dir


@pytest.fixture
def copy_of_run(finished_run, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(finished_run, copy)
  return copy


def _rounds(output_dir):
  return [int(line.split(',', 1)[0]) for line in
          (output_dir / 'metrics.csv').read_text().splitlines()[1:]]


def _snapshot(output_dir):
  return {p: p.read_bytes() for p in sorted(output_dir.rglob('*'))
          if p.is_file() and p.name != 'run.lock'}


def test_rerunning_a_finished_run_says_it_trains_nothing(copy_of_run, capsys):
  # It printed "Resuming from the state saved after round 3" and "after 3
  # rounds (N s)", as if it had trained.
  capsys.readouterr()
  rows = _rounds(copy_of_run)
  _run(copy_of_run)
  out = capsys.readouterr().out
  assert (f'All 3 rounds are already trained in {copy_of_run} (the state '
          'saved after round 3): nothing to train') in out
  assert 'Resuming' not in out
  assert 'after 3 rounds (all trained by an earlier run)' in out
  assert _rounds(copy_of_run) == rows


def test_save_every_0_refuses_another_runs_results(copy_of_run):
  # The sequence: a second run with other flags and no saving
  # rewrote metrics.csv; a third resumed the first's state on top of it.
  before = _snapshot(copy_of_run)
  with pytest.raises(run_dir.RunDirError,
                     match=r'different flags: --client_lr=0.05 \(now 0.5\)'):
    _run(copy_of_run, rounds=2, save_every=0, client_lr=0.5)
  with pytest.raises(run_dir.RunDirError, match='--save_every=0 would neither '
                     'resume nor keep'):
    _run(copy_of_run, save_every=0)
  assert _snapshot(copy_of_run) == before

  summary = _run(copy_of_run, rounds=2, save_every=0, client_lr=0.5,
                 overwrite=True)
  assert summary['resumed_from_round'] is None
  assert _rounds(copy_of_run) == [0, 1, 2]
  assert not (copy_of_run / 'program_state').exists()
  with pytest.raises(run_dir.RunDirError, match='different flags'):
    _run(copy_of_run, rounds=5)
  assert _rounds(copy_of_run) == [0, 1, 2]


def test_a_held_output_dir_is_refused_naming_its_holder(tmp_path, capsys):
  output_dir = tmp_path / 'run'
  with run_dir.lock(str(output_dir)):
    with pytest.raises(run_dir.RunDirError,
                       match=rf'in use by another run \(pid {os.getpid()}: '):
      _run(output_dir)
  assert not (output_dir / 'metrics.csv').exists()
  # A holder that died leaves its line (the kernel drops the lock itself).
  (output_dir / 'run.lock').write_text('pid 999999999: python -m killed\n')
  with run_dir.lock(str(output_dir)):
    pass
  assert ('taking over the lock of ' f'{output_dir} from a run that ended '
          'without releasing it (pid 999999999: python -m killed)') in (
              capsys.readouterr().err)
  with run_dir.lock(str(output_dir)):  # Released cleanly: no note.
    pass
  assert 'taking over' not in capsys.readouterr().err


def test_a_damaged_latest_save_is_skipped_for_the_previous_one(
    copy_of_run, capsys):
  data = (copy_of_run / 'program_state' / 'program_state_3' / 'variables' /
          'variables.data-00000-of-00001')
  size = data.stat().st_size
  with open(data, 'r+b') as f:
    f.truncate(size // 2)
  summary = _run(copy_of_run, rounds=4)
  out = capsys.readouterr().out
  assert (f'Skipping the save of round 3 ({data.parent.parent}: '
          f'variables/variables.data-00000-of-00001 has {size // 2} bytes, '
          f'{size} were saved') in out, out
  assert 'using the save of round 2.' in out
  assert summary['resumed_from_round'] == 2
  assert _rounds(copy_of_run) == [0, 1, 2, 3, 4]
  assert (copy_of_run / 'program_state' /
          'damaged_program_state_3').is_dir()  # Kept for inspection.


def test_no_intact_save_is_an_error_naming_the_directory(copy_of_run):
  for data in (copy_of_run / 'program_state').glob(
      'program_state_*/variables/variables.data-*'):
    data.write_bytes(data.read_bytes()[:100])
  before = _snapshot(copy_of_run)
  with pytest.raises(run_dir.RunDirError,
                     match=f'none of its saves in {copy_of_run}/program_state '
                     'is intact: round 3: variables/variables.data'):
    _run(copy_of_run, rounds=4)
  assert _snapshot(copy_of_run) == before


def test_a_truncated_metrics_csv_is_refused_not_resumed(copy_of_run):
  csv_path = copy_of_run / 'metrics.csv'
  text = csv_path.read_bytes()
  csv_path.write_bytes(text[:len(text) // 2])  # Cut inside a row.
  with pytest.raises(run_dir.RunDirError, match=r'saved after round 3, but '
                     r'its metrics.csv does not hold every round up to it '
                     r'\(round\(s\) \d(-3)? missing'):
    _run(copy_of_run, rounds=4)
  assert csv_path.read_bytes() == text[:len(text) // 2]


def test_a_missing_run_flags_json_is_refused(copy_of_run):
  os.remove(copy_of_run / 'run_flags.json')
  with pytest.raises(run_dir.RunDirError, match='but no run_flags.json, so '
                     'they cannot be checked'):
    _run(copy_of_run, client_lr=0.5)
  assert not (copy_of_run / 'run_flags.json').exists()


def test_a_diverged_run_writes_strict_json(tmp_path):
  def reject(constant):
    raise ValueError(f'not JSON: {constant}')

  _run(tmp_path / 'run', server_lr=1e30, client_lr=1e30, rounds=2,
       eval_every=1)
  with open(tmp_path / 'run' / 'summary.json') as f:
    summary = json.load(f, parse_constant=reject)
  assert summary['diverged'] is True
  assert summary['diverged_at_round'] == 1
  assert summary['final_central_test']['loss'] is None


def _run_async(coroutine):
  # A private loop: asyncio.run would unset the loop TFF's training loop uses.
  loop = asyncio.new_event_loop()
  try:
    return loop.run_until_complete(coroutine)
  finally:
    loop.close()


def test_a_save_without_its_manifest_is_not_loaded(tmp_path):
  manager = run_dir.ProgramStateManager(str(tmp_path))
  structure = {'w': np.zeros([3], np.float32), 'round': np.int64(0)}
  _run_async(manager.save(
      {'w': np.arange(3, dtype=np.float32), 'round': np.int64(4)}, 4))
  _run_async(manager.save(
      {'w': np.ones(3, dtype=np.float32), 'round': np.int64(6)}, 6))
  # A crash after TFF wrote round 6 and before its manifest.
  os.remove(tmp_path / 'program_state' / 'program_state_6' /
            'tff_fad_manifest.json')
  state, version = _run_async(manager.load_latest(structure))
  assert version == 4
  np.testing.assert_array_equal(state['w'], [0.0, 1.0, 2.0])


def test_finished_summary_is_the_runs_own_only_for_the_same_results(
    finished_run, tmp_path):
  with flagsaver.flagsaver(output_dir=str(finished_run), **_FLAGS):
    values = experiment.flag_values(hypergradient_main.__name__)
  with open(finished_run / run_dir.SUMMARY_FILE) as f:
    summary = json.load(f)
  assert run_dir.finished_summary(str(finished_run), values) == summary
  # Where it runs and how often it saves do not change what it computed.
  for same in (dict(save_every=7), dict(workers=['localhost:8000']),
               dict(output_dir='elsewhere')):
    assert run_dir.finished_summary(str(finished_run),
                                    {**values, **same}) == summary
  # More rounds (a run to continue) or another seed: not this run's summary.
  for other in (dict(rounds=4), dict(seed=2), dict(server_lr=0.2)):
    assert run_dir.finished_summary(str(finished_run),
                                    {**values, **other}) is None
  assert run_dir.finished_summary(str(tmp_path), values) is None


def _drop_recorded_flag(path, name):
  """Makes a run look like one made before flag `name` existed."""
  with open(path) as f:
    content = json.load(f)
  flag_values = content['flags'] if 'flags' in content else content
  del flag_values[name]
  with open(path, 'w') as f:
    json.dump(content, f)


def test_a_flag_added_since_a_run_is_unchanged_at_its_default(copy_of_run):
  _drop_recorded_flag(copy_of_run / run_dir.FLAGS_FILE, 'hyper_beta_2')
  with pytest.raises(run_dir.RunDirError,
                     match=r"--hyper_beta_2=None \(now 0.5\)"):
    _run(copy_of_run, rounds=4, hyper_beta_2=0.5)
  summary = _run(copy_of_run, rounds=4)  # Default 0.999: resumed.
  assert summary['resumed_from_round'] == 3
  assert _rounds(copy_of_run) == [0, 1, 2, 3, 4]


def test_a_finished_run_from_before_a_flag_is_kept_at_its_default(
    copy_of_run):
  _drop_recorded_flag(copy_of_run / run_dir.SUMMARY_FILE, 'hyper_beta_2')
  with flagsaver.flagsaver(output_dir=str(copy_of_run), **_FLAGS):
    values = experiment.flag_values(hypergradient_main.__name__)
  assert run_dir.finished_summary(str(copy_of_run), values) is not None
  assert run_dir.finished_summary(
      str(copy_of_run), {**values, 'hyper_beta_2': 0.5}) is None
