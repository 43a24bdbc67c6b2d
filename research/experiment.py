"""Plumbing shared by the training binaries: flags, data, evaluation, outputs.

The federated-setting, data and bookkeeping flags are defined here once, so
both binaries can be imported into one process (tests, notebooks); each
binary sets its own defaults with `set_flag_defaults` when it is imported.
The helper functions take values, not flags.
"""

import collections
import contextlib
import csv
import math
import os
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from absl import app
from absl import flags
from absl import logging

from research import run_dir
from tff_fad import data as fad_data
from tff_fad import runtime
from tff_fad import workers
from tff_fad.learning import models

# Federated setting.
ROUNDS = flags.DEFINE_integer('rounds', 40, 'Training rounds.')
CLIENTS_PER_ROUND = flags.DEFINE_integer('clients_per_round', 10,
                                         'Clients sampled per round.')
NUM_CLIENTS = flags.DEFINE_integer('num_clients', 20,
                                   'Clients in the embedded digits split.')
DIRICHLET_ALPHA = flags.DEFINE_string(
    'dirichlet_alpha', '0.5',
    "Label-skew concentration of the digits split, or 'iid'.")
BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Client batch size.')
CLIENT_LR = flags.DEFINE_float('client_lr', 0.05, 'Client learning rate.')
AGGREGATOR = flags.DEFINE_enum('aggregator', 'mean', ['mean', 'dp'],
                               'Aggregation of the client uploads.')
DP_NOISE = flags.DEFINE_float('dp_noise_multiplier', 0.1,
                              'Gaussian noise multiplier (aggregator=dp).')
DP_CLIP = flags.DEFINE_float('dp_clip', 1.0,
                             'L2 clip of each upload (aggregator=dp).')

# Data, model, bookkeeping.
DATASET = flags.DEFINE_enum(
    'dataset', 'digits', ['digits', 'emnist'],
    "'digits': the embedded offline MNIST digits; 'emnist': federated EMNIST "
    '(needs network once, or a filled --emnist_cache_dir).')
EMNIST_CACHE_DIR = flags.DEFINE_string(
    'emnist_cache_dir', None, 'Cache directory of EMNIST (default ~/.tff).')
MODEL = flags.DEFINE_enum(
    'model', 'linear', list(models.MODEL_NAMES),
    "lenet (BAFFLE's, 26,730 params), wrn (WRN-10-2) or linear (softmax "
    'regression, 7,850 params).')
EVAL_EVERY = flags.DEFINE_integer(
    'eval_every', 5, 'Rounds between test evaluations (the last round is '
    'always evaluated).')
EVAL_EXAMPLES = flags.DEFINE_integer('eval_examples', 10000,
                                     'Test examples used (EMNIST).')
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the data split, client '
                            'sampling, initial weights and randomness.')
OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Output directory.')

# Scale and fault tolerance.
WORKERS = flags.DEFINE_list(
    'workers', [], 'host:port of running TFF worker services; each round\'s '
    'clients are split over them (TFF\'s mergeable execution). Empty: the '
    'local runtime. Trust boundary: ' + workers.TRUST_WARNING + ' Only '
    'loopback addresses are accepted without --allow_remote_workers. '
    '`python -m tff_fad.local_workers run -n 2 -- <this command>` starts local '
    'workers in a private network namespace and passes this flag.')
ALLOW_REMOTE_WORKERS = flags.DEFINE_bool(
    'allow_remote_workers', False, 'Accept non-loopback --workers: only for '
    'workers on machines and networks you trust.')
SAVE_EVERY = flags.DEFINE_integer(
    'save_every', 5, 'Rounds between saves of the training state to '
    '<output_dir>/program_state; run the same command again to resume from '
    'the last save. 0: never save, never resume.')
OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Delete the results of an earlier run in '
    '--output_dir first and start over (leave it out of a command you rerun '
    'to resume). Without it, a run refuses a directory holding results it '
    'would not resume.')


def flag_values(binary_module_name: str) -> dict:
  """The values of a binary's own flags and of the shared ones."""
  values = {}
  for module in (__name__, binary_module_name):
    for flag in flags.FLAGS.get_key_flags_for_module(sys.modules[module]):
      values[flag.name] = flag.value
  return values


def run_main(run: Callable[[], Any], argv: Sequence[str]) -> None:
  """A binary's `main`: rejects stray arguments, runs, stops TFF's worker."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # TFF's training loop logs several INFO lines per round; the progress
    # lines say the same in one.
    logging.set_verbosity(logging.WARNING)
  runtime.set_up_entry_point()
  try:
    run()
  except (fad_data.EmnistUnavailableError, run_dir.RunDirError) as e:
    # A user-facing condition with instructions, not a bug: no traceback.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (workers.WorkerError, workers.NotMergeableError) as e:
    print(f'error: {e}{_resume_hint(" (with working --workers, or none)")}',
          file=sys.stderr)
    sys.exit(3)
  except runtime.TerminatedBySignal as e:
    print(f'stopped by {e.signal_name}.{_resume_hint()}', file=sys.stderr)
    raise
  finally:
    runtime.shutdown_local_workers()


def _resume_hint(how: str = '') -> str:
  saved = None
  if OUTPUT_DIR.value and SAVE_EVERY.value > 0:
    saved = run_dir.latest_saved_round(OUTPUT_DIR.value)
  if saved is None:
    return ''
  return (f' The state of round {saved} is saved in {OUTPUT_DIR.value}: '
          f'run the same command again{how} to resume from it.')


def validate_execution_flags() -> None:
  """Checks every float flag, --workers and --save_every up front.

  Raises:
    ValueError: Naming the flag (a float flag that is not finite, a
      non-loopback worker without --allow_remote_workers, a malformed
      address, a negative --save_every).
  """
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    # Range checks (`> 0`, `< 1`) let inf, or nan, through; and TFF
    # computes in float32.
    if isinstance(value, float) and not (
        math.isfinite(value) and abs(value) <= np.finfo(np.float32).max):
      raise ValueError(f'--{name} must be a finite number (in float32), got '
                       f'{value}.')
  if SAVE_EVERY.value < 0:
    raise ValueError(f'--save_every must be >= 0, got {SAVE_EVERY.value}.')
  if WORKERS.value:
    try:
      workers.parse_addresses(WORKERS.value,
                              allow_remote=ALLOW_REMOTE_WORKERS.value)
    except ValueError as e:
      raise ValueError(f'--workers: {e}') from None


def set_flag_defaults(**defaults) -> None:
  """A binary's own defaults for the shared flags (shown by --help)."""
  for name, value in defaults.items():
    flags.FLAGS.set_default(name, value)

ACCURACY_KEY = 'evaluation/test/accuracy'
LOSS_KEY = 'evaluation/test/loss'


def parse_alpha(value: str) -> Optional[float]:
  """'iid' -> None; a positive float string -> that float."""
  if value.lower() == 'iid':
    return None
  try:
    alpha = float(value)
  except ValueError:
    alpha = -1.0
  if not alpha > 0:
    raise ValueError(
        f"--dirichlet_alpha must be 'iid' or a positive number, got {value!r}.")
  return alpha


def load_data(dataset: str, *, num_clients: int, dirichlet_alpha: str,
              seed: int, pad_to_32x32: bool, emnist_cache_dir: str,
              eval_examples: int):
  """Returns (train ClientData with x/y elements, test arrays, image shape)."""
  if dataset == 'digits':
    fed = fad_data.load_federated_digits(
        num_clients=num_clients, dirichlet_alpha=parse_alpha(dirichlet_alpha),
        seed=seed, pad_to_32x32=pad_to_32x32)
    return fed.train, fed.test, fed.image_shape
  train, test = fad_data.load_emnist(emnist_cache_dir, only_digits=True)

  def to_xy(element):
    # EMNIST has 1.0 as background; MNIST-style models expect 0.0.
    x = 1.0 - tf.expand_dims(element['pixels'], -1)
    if pad_to_32x32:
      x = tf.pad(x, [[2, 2], [2, 2], [0, 0]])
    return collections.OrderedDict(x=x, y=tf.cast(element['label'], tf.int32))

  train = train.preprocess(lambda ds: ds.map(to_xy))
  test_ds = test.create_tf_dataset_from_all_clients().map(to_xy)
  batch = next(iter(test_ds.take(eval_examples).batch(eval_examples)))
  test_arrays = {k: v.numpy() for k, v in batch.items()}
  return train, test_arrays, tuple(test_arrays['x'].shape[1:])


def client_selector(train: tff.simulation.datasets.ClientData, *,
                    clients_per_round: int, batch_size: int, epochs: int,
                    seed: int) -> Callable[[int], list]:
  """Round -> the round's client datasets; reproducible from the seed."""
  client_ids = list(train.client_ids)
  if clients_per_round > len(client_ids):
    raise ValueError(f'--clients_per_round={clients_per_round} exceeds the '
                     f'{len(client_ids)} clients.')

  def select(round_num: int) -> list:
    rng = np.random.default_rng([seed, round_num])
    chosen = rng.choice(len(client_ids), clients_per_round, replace=False)
    return [
        train.create_tf_dataset_for_client(client_ids[i]).shuffle(
            1000, seed=seed * 100_003 + round_num).repeat(epochs).batch(
                batch_size)
        for i in chosen
    ]

  return select


def test_evaluator(net: models.FunctionalNet, test: dict):
  """`trainable weights -> (accuracy, loss)` on the held-out test set."""
  test_x = tf.constant(test['x'])
  test_y = tf.constant(test['y'])

  @tf.function
  def evaluate(trainable):
    logits = tf.concat([net.apply(trainable, test_x[i:i + 500])
                        for i in range(0, int(test_x.shape[0]), 500)], 0)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(
        tf.argmax(logits, -1, output_type=tf.int32), test_y), tf.float32))
    return accuracy, models.sparse_softmax_loss(logits, test_y)

  def evaluate_weights(trainable) -> collections.OrderedDict:
    accuracy, loss = evaluate([tf.constant(w) for w in trainable])
    return collections.OrderedDict(test=collections.OrderedDict(
        accuracy=float(accuracy), loss=float(loss)))

  return evaluate_weights


def flatten(value: Any, prefix: tuple = ()) -> Iterable[tuple]:
  """Yields (path, scalar) pairs of a nested mapping of numbers."""
  if isinstance(value, (dict, collections.OrderedDict)):
    for k, v in value.items():
      yield from flatten(v, prefix + (str(k),))
  elif np.ndim(value) == 0:
    yield prefix, value


class ProgressReleaseManager(tff.program.ReleaseManager):
  """Prints one line per round (plots and summaries read `metrics.csv`)."""

  def __init__(self, total_rounds: int, columns: Sequence[tuple]):
    """`columns`: (label, flattened key, format) printed when present."""
    self._total = total_rounds
    self._columns = columns

  async def release(self, value: Any, key: int) -> None:
    flat = {'/'.join(path): float(v) for path, v in flatten(value)}
    parts = [f'round {key:4d}/{self._total}']
    for label, metric, fmt in self._columns:
      if metric in flat:
        parts.append(f'{label} {flat[metric]:{fmt}}')
    if 'training_time_in_seconds' in flat:
      parts.append(f"({flat['training_time_in_seconds']:.1f} s)")
    print('  '.join(parts), flush=True)


def read_metrics(output_dir: str) -> dict:
  """round -> {'a/b/c': float} from `metrics.csv` (all rounds, any run)."""
  history = {}
  with open(os.path.join(output_dir, 'metrics.csv'), newline='') as f:
    for row in csv.DictReader(f):
      values = {}
      for key, value in row.items():
        if key == 'round' or value in (None, ''):
          continue
        try:
          values[key] = float(value)
        except ValueError:
          pass  # Not a scalar (none are written today).
      history[int(row['round'])] = values
  return history


def execution_context():
  """The TFF context of the training loop: --workers, or the local one."""
  if not WORKERS.value:
    return contextlib.nullcontext()
  return workers.worker_context(WORKERS.value,
                                allow_remote=ALLOW_REMOTE_WORKERS.value)


def train(process, select_clients, *, output_dir: str, rounds: int,
          evaluate, eval_every: int, progress: 'ProgressReleaseManager',
          flag_values: dict):
  """`tff.simulation.run_training_process`, resumable, on --workers.

  Saves the state every --save_every rounds (and round 0) in
  `<output_dir>/program_state`; if a verified save exists (and the flags that
  shape the run match), training resumes after it (`run_dir.prepare` says
  what else an existing directory allows). Metrics go to `metrics.csv`
  (TFF's CSV manager drops rows after the resumed round before writing, so
  nothing is duplicated), TensorBoard and `progress`.

  The caller has checked the flags (`validate_execution_flags`) and holds
  `run_dir.lock(output_dir)`.

  Returns:
    `(final state, resumed-from round or None)`.
  """
  save_every = SAVE_EVERY.value
  resumed_from = run_dir.prepare(output_dir, flag_values,
                                 save_every=save_every,
                                 overwrite=OVERWRITE.value, rounds=rounds)
  kwargs = {}
  if save_every:
    kwargs = dict(
        program_state_manager=run_dir.ProgramStateManager(output_dir,
                                                          keep_total=3),
        rounds_per_saving_program_state=save_every)
  if WORKERS.value:
    print(f'Rounds run on {len(WORKERS.value)} TFF worker(s): '
          f'{",".join(WORKERS.value)}', flush=True)
  with execution_context():
    state = tff.simulation.run_training_process(
        process, select_clients, rounds, evaluation_fn=evaluate,
        evaluation_selection_fn=lambda _: None,
        rounds_per_evaluation=eval_every,
        metrics_managers=release_managers(output_dir, progress), **kwargs)
  return state, resumed_from


def release_managers(output_dir: str, progress: ProgressReleaseManager):
  """CSV (keyed by round), TensorBoard and the progress printer."""
  return [
      tff.program.CSVFileReleaseManager(
          os.path.join(output_dir, 'metrics.csv'),
          save_mode=tff.program.CSVSaveMode.WRITE, key_fieldname='round'),
      tff.program.TensorBoardReleaseManager(
          os.path.join(output_dir, 'tensorboard')),
      progress,
  ]


def plot_series(path: str, title: str, panels: Sequence[dict]) -> None:
  """Writes a PNG with one panel per dict(rounds, values, ylabel, ...)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # No display; write a file.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
  axes = np.atleast_1d(axes)
  for ax, panel in zip(axes, panels):
    ax.plot(panel['rounds'], panel['values'], marker='.')
    for y, label in panel.get('hlines', ()):
      ax.axhline(y, color='gray', linestyle=':', label=label)
    ax.set_xlabel('round')
    ax.set_ylabel(panel['ylabel'])
    if panel.get('log'):
      ax.set_yscale('log')
    if panel.get('ylim'):
      ax.set_ylim(*panel['ylim'])
    if panel.get('hlines'):
      ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
