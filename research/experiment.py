"""Plumbing shared by the training binaries: flags, data, evaluation, outputs.

The federated-setting, data and bookkeeping flags are defined here once, so
both binaries can be imported into one process (tests, notebooks); each
binary sets its own defaults with `set_flag_defaults` when it is imported.
The checks (`validate_*`, `require_*`) read flags and raise `FlagError`; the
other helpers take values.
"""

import collections
import contextlib
import csv
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from absl import app
from absl import flags
from absl import logging
from absl.testing import flagsaver

from research import run_dir
from research import tasks
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
DP_DELTA = flags.DEFINE_float(
    'dp_delta', 1e-5, 'With --aggregator=dp: the delta of the reported '
    '(epsilon, delta).')

# Task: data, model, client specs, evaluation.
TASK = flags.DEFINE_enum(
    'task', 'digits', ['digits', *tasks.TASK_NAMES],
    "'digits': the embedded offline MNIST digits split into --num_clients "
    "clients, with --model. The others are tff.simulation.baselines tasks "
    "with the task's own Keras model (--task_model) converted to a "
    'functional model; they download their data once (--task_cache_dir), or '
    "use TFF's offline synthetic data with --use_synthetic_data. Task "
    'models: ' + '; '.join(
        f'{name}: {", ".join(ids)} (default {default})'
        for name, (default, ids) in tasks.MODEL_IDS.items()) + '.')
TASK_MODEL = flags.DEFINE_string(
    'task_model', None, "Model id of a tff.simulation.baselines --task "
    "(default: the task's default; see --task).")
ONLY_DIGITS = flags.DEFINE_bool(
    'only_digits', True, '--task=emnist_character: the 10 digits, or all 62 '
    'characters with --noonly_digits.')
USE_SYNTHETIC_DATA = flags.DEFINE_bool(
    'use_synthetic_data', False, "tff.simulation.baselines tasks: TFF's own "
    'offline synthetic client data (for trying a command without network).')
TASK_CACHE_DIR = flags.DEFINE_string(
    'task_cache_dir', None, 'Cache directory of the tff.simulation.baselines '
    "tasks' data (default ~/.tff).")
MODEL = flags.DEFINE_enum(
    'model', 'linear', list(models.MODEL_NAMES),
    "--task=digits: lenet (BAFFLE's, 26,730 params), wrn (WRN-10-2) or "
    'linear (softmax regression, 7,850 params).')
# One flag for every experiments script (they can be imported together):
# each names its own experiments and default (`experiment_name`).
EXPERIMENT = flags.DEFINE_string(
    'experiment', None, 'Which experiment an experiments script runs: '
    'research/hypergradient_fedavg/experiments.py: rates (default) or '
    'weighting; research/baffle/experiments.py: estimators (default) or '
    'paper.')
ACTIVATION = flags.DEFINE_enum(
    'activation', 'hardswish', list(models.ACTIVATIONS),
    "--model=lenet|wrn: the activation (BAFFLE's models use hardswish).")
CLIENT_EPOCHS = flags.DEFINE_integer('client_epochs', 1,
                                     "Local epochs over a client's data.")
MAX_ELEMENTS = flags.DEFINE_integer(
    'max_elements', 0, 'Examples a client uses per round at most (before '
    'batching; 0: all).')
EVAL_EVERY = flags.DEFINE_integer(
    'eval_every', 5, 'Rounds between test evaluations (the last round is '
    'always evaluated).')
EVAL_CLIENTS = flags.DEFINE_integer(
    'eval_clients', 0, 'Held-out test clients of each federated evaluation '
    "(the first N of the task's test clients; 0: all).")
EVAL_BATCH_SIZE = flags.DEFINE_integer('eval_batch_size', 64,
                                       'Batch size of the evaluation.')
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the data split, client '
                            'sampling, initial weights and randomness.')
OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Output directory.')

# Scale and fault tolerance.
WORKERS = flags.DEFINE_list(
    'workers', [], 'host:port of running TFF worker services; each round\'s '
    'clients are split over them (TFF\'s mergeable execution; a round with '
    'several aggregation layers, e.g. --fad_mode=reverse, runs in stages). '
    'Empty: the local runtime. Trust boundary: ' + workers.TRUST_WARNING + ' '
    'Workers on other machines run behind TLS fronts (`python -m '
    'tff_fad.local_workers serve`) and are reached with --worker_tls_*; '
    'without those, only loopback addresses are accepted unless '
    '--allow_remote_workers. `python -m tff_fad.local_workers run -n 2 -- '
    '<this command>` starts local workers in a private network namespace and '
    'passes this flag.')
WORKER_TLS_CA = flags.DEFINE_string(
    'worker_tls_ca', None, 'PEM CA certificate that signed the --workers\' '
    'certificates: connect with TLS (`python -m tff_fad.worker_tls '
    'make-certs` makes a test CA).')
WORKER_TLS_CERT = flags.DEFINE_string(
    'worker_tls_cert', None, 'PEM client certificate this driver presents to '
    'the --workers (signed by their CA).')
WORKER_TLS_KEY = flags.DEFINE_string(
    'worker_tls_key', None, 'Private key of --worker_tls_cert (PEM).')
ALLOW_REMOTE_WORKERS = flags.DEFINE_bool(
    'allow_remote_workers', False, 'Accept non-loopback --workers over '
    'plaintext (without --worker_tls_ca): only for workers on machines and '
    'networks you trust.')
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


def run_main(run: Callable[[], Any], argv: Sequence[str],
             grid: bool = False) -> None:
  """A binary's `main`: rejects stray arguments, runs, stops TFF's worker.

  `grid`: `run` trains several runs, each in its own directory under
  --output_dir (the experiment scripts), which changes how a stop says to
  resume.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # TFF's training loop logs several INFO lines per round; the progress
    # lines say the same in one.
    logging.set_verbosity(logging.WARNING)
  runtime.set_up_entry_point()
  try:
    run()
  except (FlagError, fad_data.EmnistUnavailableError,
          tasks.TaskDataUnavailableError, run_dir.RunDirError) as e:
    # A user-facing condition with instructions, not a bug: no traceback.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (workers.WorkerError, workers.NotMergeableError) as e:
    hint = _resume_hint(' (with working --workers, or none)', grid)
    print(f'error: {e}{hint}', file=sys.stderr)
    sys.exit(3)
  except runtime.TerminatedBySignal as e:
    print(f'stopped by {e.signal_name}.{_resume_hint(grid=grid)}',
          file=sys.stderr)
    raise
  finally:
    runtime.shutdown_local_workers()


def _resume_hint(how: str = '', grid: bool = False) -> str:
  if grid:  # The stopped run's directory is not --output_dir.
    if SAVE_EVERY.value <= 0:
      return ''
    return (f' Run the same command again{how} to go on: each run resumes '
            'from its last save in its directory under '
            f'{OUTPUT_DIR.value}.')
  saved = None
  if OUTPUT_DIR.value and SAVE_EVERY.value > 0:
    saved = run_dir.latest_saved_round(OUTPUT_DIR.value)
  if saved is None:
    return ''
  return (f' The state of round {saved} is saved in {OUTPUT_DIR.value}: '
          f'run the same command again{how} to resume from it.')


class FlagError(ValueError):
  """A flag's value is wrong; the message names the flag.

  `run_main` prints it as one line, without a traceback: it is the user's
  input, not a bug.
  """


def require_positive(*holders: flags.FlagHolder,
                     allow_zero: bool = False) -> None:
  """FlagError naming the first of `holders` not > 0 (>= 0: `allow_zero`)."""
  for holder in holders:
    if not (holder.value >= 0 if allow_zero else holder.value > 0):
      raise FlagError(f'--{holder.name} must be '
                      f'{">= 0" if allow_zero else "> 0"}, got {holder.value}.')


def require_unit_interval(*holders: flags.FlagHolder) -> None:
  """FlagError naming the first of `holders` outside [0, 1) (decays, betas)."""
  for holder in holders:
    if not 0 <= holder.value < 1:
      raise FlagError(f'--{holder.name} must be in [0, 1), got '
                      f'{holder.value}.')


# Above this epsilon an (epsilon, delta) guarantee bounds almost nothing
# (deployed DP training reports single digits); the binaries say so.
MEANINGFUL_EPSILON = 10.0


def print_privacy(report) -> None:
  """Prints a run's `PrivacyReport` and its (epsilon, delta); a warning
  naming the flag to raise when epsilon is past `MEANINGFUL_EPSILON`."""
  print(report, flush=True)
  print(f'({report.epsilon:.4g}, {report.delta:g})-DP over {report.rounds} '
        'rounds; training metrics are not released.', flush=True)
  if report.epsilon > MEANINGFUL_EPSILON:
    print(f'Warning: epsilon {report.epsilon:.4g} > {MEANINGFUL_EPSILON:g} '
          'is no meaningful privacy guarantee: raise --dp_noise_multiplier '
          f'(now {DP_NOISE.value:g}), or train fewer rounds or sample fewer '
          'clients per round.', flush=True)


def privacy_summary(report) -> Optional[collections.OrderedDict]:
  """A summary's `privacy` field: the report's figures, None without DP."""
  return None if report is None else report.summary(DP_NOISE.value)


def training_time(summary: dict, resumed_from: Optional[int],
                  rounds: int) -> str:
  """The final line's training time: the run's wall time, or, for a rerun of
  a finished run, that an earlier run trained every round."""
  if resumed_from == rounds:
    return 'all trained by an earlier run'
  return f'{summary["wall_time_seconds"]} s'


def require_dp_delta() -> None:
  """FlagError unless --dp_delta is in (0, 1)."""
  if not 0 < DP_DELTA.value < 1:
    raise FlagError(f'--dp_delta must be in (0, 1), got {DP_DELTA.value}.')


def required_output_dir() -> str:
  """--output_dir, or a FlagError saying it is needed."""
  if not OUTPUT_DIR.value:
    raise FlagError('--output_dir is required: the directory for the run\'s '
                    'metrics, saves and summary.')
  return OUTPUT_DIR.value


def parse_numbers(holder: flags.FlagHolder, kind: type = float) -> list:
  """The items of a list flag as `kind`s; a FlagError naming the item."""
  numbers = []
  for item in holder.value:
    try:
      numbers.append(kind(item))
    except ValueError:
      what = 'an integer' if kind is int else 'a number'
      raise FlagError(f'--{holder.name}: {item!r} is not {what}.') from None
  return numbers


def validate_runs(validate: Callable[[], None], runs: Iterable[dict]) -> None:
  """Calls `validate` under each run's flag values (an experiment grid's),
  before any run trains: a bad value anywhere in the grid loses no run."""
  for values in runs:
    with flagsaver.flagsaver(**values):
      validate()


def validate_execution_flags() -> None:
  """Checks every float flag, --workers and --save_every up front.

  Raises:
    FlagError: Naming the flag (a float flag that is not finite, a
      non-loopback worker without --allow_remote_workers, a malformed
      address, a negative --save_every).
  """
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    # Range checks (`> 0`, `< 1`) let inf, or nan, through; and TFF
    # computes in float32.
    if isinstance(value, float) and not (
        math.isfinite(value) and abs(value) <= np.finfo(np.float32).max):
      raise FlagError(f'--{name} must be a finite number (in float32), got '
                      f'{value}.')
  if SAVE_EVERY.value < 0:
    raise FlagError(f'--save_every must be >= 0, got {SAVE_EVERY.value}.')
  tls = worker_tls_settings()
  if WORKERS.value:
    try:
      workers.parse_addresses(
          WORKERS.value, allow_remote=ALLOW_REMOTE_WORKERS.value or bool(tls))
    except ValueError as e:
      raise FlagError(f'--workers: {e}') from None


def worker_tls_settings():
  """The --worker_tls_* flags as a `WorkerTls`, or None without them.

  Raises:
    FlagError: For a certificate without its key (or the reverse), either
      without --worker_tls_ca, or a file that is missing or not PEM.
  """
  ca, cert, key = WORKER_TLS_CA.value, WORKER_TLS_CERT.value, WORKER_TLS_KEY.value
  if not (ca or cert or key):
    return None
  if not ca:
    raise FlagError('--worker_tls_cert / --worker_tls_key need '
                    '--worker_tls_ca (the CA that signed the workers\' '
                    'certificates).')
  if bool(cert) != bool(key):
    raise FlagError('Give --worker_tls_cert and --worker_tls_key together.')
  try:
    return workers.WorkerTls(ca, cert or None, key or None)
  except ValueError as e:
    raise FlagError(f'--worker_tls_ca / --worker_tls_cert / --worker_tls_key: '
                    f'{e}') from None


def validate_task_flags() -> None:
  """Checks the task and evaluation flags up front, naming the flag."""
  require_positive(MAX_ELEMENTS, EVAL_CLIENTS, allow_zero=True)
  require_positive(CLIENT_EPOCHS, EVAL_BATCH_SIZE)

  def given(flag):  # Set on the command line (or by a test's flagsaver).
    return flags.FLAGS[flag.name].present or (
        flag.value != flags.FLAGS[flag.name].default)

  if TASK.value == 'digits':
    for flag in (TASK_MODEL, USE_SYNTHETIC_DATA, ONLY_DIGITS):
      if given(flag):
        raise FlagError(f'--{flag.name} applies to the '
                        'tff.simulation.baselines tasks, not --task=digits.')
    parse_alpha(DIRICHLET_ALPHA.value)
    if CLIENTS_PER_ROUND.value > NUM_CLIENTS.value:
      raise FlagError(f'--clients_per_round ({CLIENTS_PER_ROUND.value}) must '
                      f'be <= --num_clients ({NUM_CLIENTS.value}).')
    if given(ACTIVATION) and MODEL.value == 'linear':
      raise FlagError('--activation applies to --model=lenet|wrn; the linear '
                      'model has none.')
  else:
    if given(MODEL) or given(ACTIVATION):
      raise FlagError(f'--model and --activation apply to --task=digits; '
                      f'--task='
                      f'{TASK.value} trains its own model (--task_model).')
    if TASK.value != 'emnist_character' and given(ONLY_DIGITS):
      raise FlagError('--only_digits applies to --task=emnist_character.')
    default, model_ids = tasks.MODEL_IDS[TASK.value]
    if TASK_MODEL.value is not None and TASK_MODEL.value not in model_ids:
      raise FlagError(f'--task_model={TASK_MODEL.value!r} is not a model of '
                      f'--task={TASK.value}: {", ".join(model_ids)} '
                      f'(default {default}).')


def experiment_name(choices: Sequence[str]) -> str:
  """--experiment, or the script's default `choices[0]`; FlagError naming
  the flag if it is not one of `choices`."""
  name = EXPERIMENT.value or choices[0]
  if name not in choices:
    raise FlagError(f'--experiment={name!r} is not one of this script\'s '
                    f'experiments: {", ".join(choices)}.')
  return name


def set_flag_defaults(**defaults) -> None:
  """A binary's own defaults for the shared flags (shown by --help)."""
  for name, value in defaults.items():
    flags.FLAGS.set_default(name, value)

CENTRAL_ACCURACY_KEY = 'evaluation/central/accuracy'
_FEDERATED_PREFIX = 'evaluation/federated/'


def accuracy_key(history: dict) -> Optional[str]:
  """The test accuracy key of a run's metrics (round -> flat metrics).

  The central evaluation's if the run has one, else the federated
  evaluation's first accuracy metric; None if neither was evaluated.
  """
  keys = {k for row in history.values() for k in row}
  if CENTRAL_ACCURACY_KEY in keys:
    return CENTRAL_ACCURACY_KEY
  federated = sorted(k for k in keys if k.startswith(_FEDERATED_PREFIX) and
                     'accuracy' in k[len(_FEDERATED_PREFIX):])
  return federated[0] if federated else None


def parse_alpha(value: str) -> Optional[float]:
  """'iid' -> None; a positive float string -> that float; else FlagError."""
  if value.lower() == 'iid':
    return None
  try:
    alpha = float(value)
  except ValueError:
    alpha = -1.0
  if not alpha > 0:
    raise FlagError(
        f"--dirichlet_alpha must be 'iid' or a positive number, got {value!r}.")
  return alpha


@dataclasses.dataclass(frozen=True)
class TrainingTask:
  """What a binary trains on, whichever --task it is.

  Attributes:
    description: E.g. "linear (7,850 params) on digits".
    model: The `tff.learning.models.FunctionalModel` trained.
    num_params: Its trainable parameter count.
    train: Raw training clients.
    preprocess_train: `(raw client dataset, shuffle seed) -> batches` per
      the client spec (epochs, max elements, batch size).
    test_clients: Raw held-out clients of the federated evaluation.
    preprocess_eval: `raw client dataset -> batches`.
    central_test: The test set as arrays for a centralized evaluation
      (`--task=digits`), or None.
    note: Anything the user should know about the model choice ('' if none).
  """

  description: str
  model: tff.learning.models.FunctionalModel
  num_params: int
  train: tff.simulation.datasets.ClientData
  preprocess_train: Callable[[tf.data.Dataset, int], tf.data.Dataset]
  test_clients: tff.simulation.datasets.ClientData
  preprocess_eval: Callable[[tf.data.Dataset], tf.data.Dataset]
  central_test: Optional[dict] = None
  note: str = ''


def load_task(*, pad_digits_to_32x32: bool,
              resize_digits: bool = False) -> TrainingTask:
  """The --task with its model and client specs, from the flags.

  `pad_digits_to_32x32`: bring the embedded 28x28 digits to LeNet's 32x32,
  by zero-padding or, with `resize_digits`, by bilinear resizing (the
  official BAFFLE code's MNIST).
  """
  epochs, batch_size = CLIENT_EPOCHS.value, BATCH_SIZE.value
  max_elements = MAX_ELEMENTS.value or None
  seed = SEED.value
  if TASK.value != 'digits':
    task = tasks.load_baseline_task(
        TASK.value, epochs=epochs, batch_size=batch_size,
        max_elements=max_elements, use_synthetic_data=USE_SYNTHETIC_DATA.value,
        model_id=TASK_MODEL.value, only_digits=ONLY_DIGITS.value,
        eval_batch_size=EVAL_BATCH_SIZE.value, cache_dir=TASK_CACHE_DIR.value)
    source = ('TFF synthetic data' if USE_SYNTHETIC_DATA.value
              else 'its data')
    return TrainingTask(
        description=(f'{task.model_id} ({task.num_params:,} params) on '
                     f'{task.name} ({source})'),
        model=task.model, num_params=task.num_params, train=task.train,
        preprocess_train=task.preprocess_train, test_clients=task.test,
        preprocess_eval=task.preprocess_eval, note=task.note)
  fed = fad_data.load_federated_digits(
      num_clients=NUM_CLIENTS.value,
      dirichlet_alpha=parse_alpha(DIRICHLET_ALPHA.value), seed=seed,
      pad_to_32x32=pad_digits_to_32x32 and not resize_digits,
      resize_to_32x32=pad_digits_to_32x32 and resize_digits)
  net = models.get_net(MODEL.value, fed.image_shape,
                       activation=ACTIVATION.value)

  def preprocess_train(dataset, shuffle_seed):
    dataset = dataset.shuffle(1000, seed=shuffle_seed).repeat(epochs)
    if max_elements:
      dataset = dataset.take(max_elements)
    return dataset.batch(batch_size)

  return TrainingTask(
      description=(f'{MODEL.value}'
                   + ('' if MODEL.value == 'linear' or ACTIVATION.value ==
                      'hardswish' else f' ({ACTIVATION.value})')
                   + f' ({net.num_params:,} params) on digits'),
      model=models.to_functional_model(net, fed.image_shape, seed=seed),
      num_params=net.num_params, train=fed.train,
      preprocess_train=preprocess_train, test_clients=fed.test_clients,
      preprocess_eval=lambda ds: ds.batch(EVAL_BATCH_SIZE.value),
      central_test=fed.test)


def client_selector(task: TrainingTask, *, clients_per_round: int, seed: int,
                    batches_per_client: Optional[int] = None
                    ) -> Callable[[int], list]:
  """Round -> the round's client datasets; a function of (seed, round).

  The one sampler of every binary and experiment script: clients are drawn
  without replacement by `default_rng([seed, round])` and each client's data
  is shuffled with its own seed, a function of `(seed, round, client)`, so a
  resumed run sees the same data. (One seed for all clients of a round
  applied one permutation to each: the embedded digits' IID clients hold
  their examples in index order, in which labels nearly repeat 0..9, so every
  client's first batch had nearly the same labels.)
  `batches_per_client` keeps only the first batches (BAFFLE's FedSGD and
  TFF's FedSGD take one). A FlagError if the task has fewer training clients
  than `clients_per_round` (--clients_per_round).
  """
  client_ids = list(task.train.client_ids)
  if clients_per_round > len(client_ids):
    raise FlagError(f'--clients_per_round={clients_per_round} exceeds the '
                    f'{len(client_ids)} training clients.')

  def select(round_num: int) -> list:
    rng = np.random.default_rng([seed, round_num])
    chosen = rng.choice(len(client_ids), clients_per_round, replace=False)
    datasets = []
    for i in chosen:
      shuffle_seed = int(np.random.default_rng(
          [seed, round_num, int(i)]).integers(2**62))
      dataset = task.preprocess_train(
          task.train.create_tf_dataset_for_client(client_ids[i]),
          shuffle_seed)
      if batches_per_client:
        dataset = dataset.take(batches_per_client)
      datasets.append(dataset)
    return datasets

  return select


def central_evaluator(model: tff.learning.models.FunctionalModel,
                      test: dict) -> Callable[[Any], collections.OrderedDict]:
  """`model weights -> OrderedDict(accuracy, loss)` on the test arrays."""
  test_x, test_y = tf.constant(test['x']), tf.constant(test['y'])

  @tf.function
  def evaluate(weights):
    logits = tf.concat([
        model.predict_on_batch(weights, test_x[i:i + 500], training=False)
        for i in range(0, int(test_x.shape[0]), 500)], 0)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(
        tf.argmax(logits, -1, output_type=tf.int32), test_y), tf.float32))
    return accuracy, model.loss(logits, test_y)

  def evaluate_weights(weights) -> collections.OrderedDict:
    accuracy, loss = evaluate((
        tuple(tf.constant(w) for w in weights.trainable),
        tuple(tf.constant(w) for w in weights.non_trainable)))
    return collections.OrderedDict(accuracy=float(accuracy), loss=float(loss))

  return evaluate_weights


def evaluator(task: TrainingTask, eval_clients: int):
  """`model weights -> OrderedDict(federated=..., [central=...])`.

  `federated`: TFF's `build_fed_eval` of the model on the held-out test
  clients (the first `eval_clients` in sorted order, or all): the model's
  finalized metrics. `central`: accuracy and loss on the test arrays, where
  the task has them (labelled so: it is not what TFF research reports).
  """
  eval_process = tff.learning.algorithms.build_fed_eval(task.model)
  initial_state = eval_process.initialize()
  test_ids = sorted(task.test_clients.client_ids)[:eval_clients or None]
  test_data = [task.preprocess_eval(
      task.test_clients.create_tf_dataset_for_client(c)) for c in test_ids]
  central = (central_evaluator(task.model, task.central_test)
             if task.central_test is not None else None)

  def evaluate(weights) -> collections.OrderedDict:
    state = eval_process.set_model_weights(initial_state, weights)
    metrics = eval_process.next(state, test_data).metrics
    result = collections.OrderedDict(
        federated=metrics['client_work']['eval']['current_round_metrics'])
    if central is not None:
      result['central'] = central(weights)
    return result

  return evaluate


def final_evaluation(final: dict, history: dict, rounds: int):
  """Records the last round's evaluation in `history`; the summary's part.

  Args:
    final: `evaluator(...)`'s result for the final model.
    history: round -> flat metrics (`read_metrics`); the last round gets the
      final evaluation (the loop evaluates it only every --eval_every).
    rounds: The last round.

  Returns:
    `(accuracy key, OrderedDict)` of summary fields: `final_test_accuracy`
    (central if the task has a central test set, else federated; which one is
    `test_accuracy_from`), `final_central_test` and `final_federated_test`
    (all finalized metrics; None where not evaluated) and
    `accuracy_by_round`.
  """
  history.setdefault(rounds, {}).update({
      '/'.join(('evaluation',) + path): float(value)
      for path, value in flatten(final)})
  key = accuracy_key(history)
  rounds_evaluated = sorted(r for r in history if key in history[r])
  return key, collections.OrderedDict(
      final_test_accuracy=history[rounds].get(key),
      test_accuracy_from=('central' if key == CENTRAL_ACCURACY_KEY
                          else 'federated'),
      final_central_test=_to_floats(final.get('central')),
      final_federated_test=_to_floats(final['federated']),
      accuracy_by_round={str(r): history[r][key] for r in rounds_evaluated})


def _to_floats(metrics):
  if metrics is None:
    return None
  return collections.OrderedDict(('/'.join(path), float(value))
                                 for path, value in flatten(metrics))


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


_EVALUATION_TIME_KEY = (tff.simulation.EVALUATION_METRICS_PREFIX +
                        tff.simulation.EVALUATION_TIME_KEY)


def wall_time(start: float, history: dict,
              resumed_from: Optional[int]) -> collections.OrderedDict:
  """A summary's wall-time fields; `start` is when this process began.

  A run resumed from round r counts, besides this part's time, the time TFF's
  loop recorded for rounds 0..r (training and evaluation), which the earlier
  parts spent on what this run kept; their set-up and the rounds lost to the
  interruption are not counted. Without this, a run finished in parts
  reported only its last part.
  """
  before = 0.0
  if resumed_from is not None:
    for round_num, metrics in history.items():
      if round_num <= resumed_from:
        before += metrics.get(tff.simulation.TRAINING_TIME_KEY, 0.0)
        before += metrics.get(_EVALUATION_TIME_KEY, 0.0)
  return collections.OrderedDict(
      wall_time_seconds=round(time.time() - start + before, 1),
      wall_time_seconds_before_resuming=round(before, 1))


def execution_context():
  """The TFF context of the training loop: --workers, or the local one."""
  if not WORKERS.value:
    return contextlib.nullcontext()
  return workers.worker_context(WORKERS.value, tls=worker_tls_settings(),
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
    `(final state, resumed-from round or None, evaluate(final state))`: the
    loop's own evaluation of the last round when it made one (rounds a
    multiple of `eval_every`), so the final state is not evaluated twice.
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
  last_evaluation = {}

  def evaluate_and_keep(state, data):
    last_evaluation.update(state=state, result=evaluate(state, data))
    return last_evaluation['result']

  with execution_context():
    state = tff.simulation.run_training_process(
        process, select_clients, rounds, evaluation_fn=evaluate_and_keep,
        evaluation_selection_fn=lambda _: None,
        rounds_per_evaluation=eval_every,
        metrics_managers=release_managers(output_dir, progress), **kwargs)
    if last_evaluation.get('state') is state:
      final = last_evaluation['result']
    else:
      final = evaluate(state, None)
  return state, resumed_from, final


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
