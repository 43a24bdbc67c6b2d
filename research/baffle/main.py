r"""Trains a model with BAFFLE (forward-only federated learning).

Runs on the embedded offline digits by default:

  python -m research.baffle.main --output_dir /tmp/baffle

writes `metrics.csv` (one row per round), `tensorboard/`, `accuracy.png` and
`summary.json` (final test accuracy, upload bytes per client per round, flags)
to `--output_dir`, and prints progress and the final accuracy.
"""

import collections
import json
import os
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad  # Registers the shutdown of TFF's worker process at exit.
from tff_fad import data as fad_data
from tff_fad.learning import baffle
from tff_fad.learning import models

# BAFFLE hyperparameters.
_K = flags.DEFINE_integer('K', 100, 'Number of perturbations per round (the '
                          'paper uses 100 and 500).')
_SIGMA = flags.DEFINE_float('sigma', 1e-4, 'Perturbation scale.')
_ESTIMATOR = flags.DEFINE_enum('estimator', 'forward', list(baffle.ESTIMATORS),
                               'Gradient estimator.')
_MODE = flags.DEFINE_enum('mode', 'fedsgd', list(baffle.MODES),
                          "'fedsgd': upload K scores; 'one_epoch': forward-only"
                          ' local epoch, upload model deltas.')
_CLIP = flags.DEFINE_float('clip', 0.3, 'Elementwise clamp of the gradient '
                           'estimate; 0 disables it.')
_EMA = flags.DEFINE_float('ema', 0.0, 'EMA decay of the evaluated weights; 0 '
                          'disables it.')
_LR = flags.DEFINE_float('lr', 1e-2, 'Server Adam learning rate (fedsgd) or '
                         'server SGD learning rate (one_epoch).')
_CLIENT_LR = flags.DEFINE_float('client_lr', 0.05,
                                'Client learning rate (one_epoch only).')
_PARALLEL = flags.DEFINE_integer('parallel_perturbations', 1,
                                 'Perturbations evaluated concurrently.')

# Federated setting.
_ROUNDS = flags.DEFINE_integer('rounds', 200, 'Training rounds.')
_CLIENTS_PER_ROUND = flags.DEFINE_integer('clients_per_round', 5,
                                          'Clients sampled per round.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 20, 'Clients in the '
                                    'embedded digits split.')
_DIRICHLET_ALPHA = flags.DEFINE_string(
    'dirichlet_alpha', '0.5', "Label-skew concentration of the digits split, "
    "or 'iid'.")
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Client batch size.')
_AGGREGATOR = flags.DEFINE_enum('aggregator', 'mean', ['mean', 'dp'],
                                'Aggregation of the client uploads.')
_DP_NOISE = flags.DEFINE_float('dp_noise_multiplier', 0.1,
                               'Gaussian noise multiplier (aggregator=dp).')
_DP_CLIP = flags.DEFINE_float('dp_clip', 10.0,
                              'L2 clip of each upload (aggregator=dp).')

# Data, model, bookkeeping.
_DATASET = flags.DEFINE_enum('dataset', 'digits', ['digits', 'emnist'],
                             'Embedded offline digits or federated EMNIST.')
_EMNIST_CACHE_DIR = flags.DEFINE_string(
    'emnist_cache_dir', None, 'Cache directory of EMNIST (default ~/.tff).')
_MODEL = flags.DEFINE_enum(
    'model', 'linear', list(models.MODEL_NAMES),
    'lenet (BAFFLE\'s, 26,730 params), wrn (WRN-10-2) or linear (softmax '
    'regression, 7,850 params). Forward-only training needs forward passes '
    'in proportion to the parameter count, so the quick default is linear.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 20, 'Rounds between test '
                                   'evaluations (the last round is always '
                                   'evaluated).')
_EVAL_EXAMPLES = flags.DEFINE_integer('eval_examples', 10000,
                                      'Test examples used (EMNIST).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the data split, client '
                             'sampling, initial weights and perturbations.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Output directory.')


def _positive(flag: flags.FlagHolder, allow_zero: bool = False) -> None:
  ok = flag.value >= 0 if allow_zero else flag.value > 0
  if not ok:
    raise ValueError(f'--{flag.name} must be {">= 0" if allow_zero else "> 0"}'
                     f', got {flag.value}.')


def parse_alpha(value: str) -> Optional[float]:
  """Parses --dirichlet_alpha: None for IID, else a positive float."""
  if value.strip().lower() == 'iid':
    return None
  try:
    alpha = float(value)
  except ValueError:
    alpha = -1.0
  if not alpha > 0:
    raise ValueError(
        f"--dirichlet_alpha must be 'iid' or a number > 0, got {value!r}.")
  return alpha


def validate_flags() -> None:
  """Raises ValueError naming the first bad flag."""
  if not _OUTPUT_DIR.value:
    raise ValueError('--output_dir is required.')
  for flag in (_K, _SIGMA, _ROUNDS, _CLIENTS_PER_ROUND, _NUM_CLIENTS,
               _BATCH_SIZE, _LR, _CLIENT_LR, _EVAL_EVERY, _EVAL_EXAMPLES,
               _PARALLEL, _DP_CLIP):
    _positive(flag)
  for flag in (_CLIP, _DP_NOISE):
    _positive(flag, allow_zero=True)
  if not 0.0 <= _EMA.value < 1.0:
    raise ValueError(f'--ema must be in [0, 1), got {_EMA.value}.')
  if _DATASET.value == 'digits' and (
      _CLIENTS_PER_ROUND.value > _NUM_CLIENTS.value):
    raise ValueError(f'--clients_per_round ({_CLIENTS_PER_ROUND.value}) must '
                     f'be <= --num_clients ({_NUM_CLIENTS.value}).')
  parse_alpha(_DIRICHLET_ALPHA.value)


def _load_data(pad: bool) -> tuple[tff.simulation.datasets.ClientData,
                                    dict[str, np.ndarray], tuple[int, ...]]:
  """Returns (train client data with x/y elements, test arrays, image shape)."""
  if _DATASET.value == 'digits':
    fed = fad_data.load_federated_digits(
        num_clients=_NUM_CLIENTS.value,
        dirichlet_alpha=parse_alpha(_DIRICHLET_ALPHA.value),
        seed=_SEED.value, pad_to_32x32=pad)
    return fed.train, fed.test, fed.image_shape
  train, test = fad_data.load_emnist(_EMNIST_CACHE_DIR.value, only_digits=True)

  def to_xy(element):
    # EMNIST has 1.0 as background; MNIST-style models expect 0.0.
    x = 1.0 - tf.expand_dims(element['pixels'], -1)
    if pad:
      x = tf.pad(x, [[2, 2], [2, 2], [0, 0]])
    return collections.OrderedDict(x=x, y=tf.cast(element['label'], tf.int32))

  train = train.preprocess(lambda ds: ds.map(to_xy))
  test_ds = test.create_tf_dataset_from_all_clients().map(to_xy)
  batch = next(iter(test_ds.take(_EVAL_EXAMPLES.value).batch(
      _EVAL_EXAMPLES.value)))
  test_arrays = {k: v.numpy() for k, v in batch.items()}
  return train, test_arrays, tuple(test_arrays['x'].shape[1:])


# Keys of the flattened per-round metrics (run_training_process nests the
# evaluation metrics under 'evaluation').
_ACCURACY_KEY = 'evaluation/test/accuracy'
_LOSS_KEY = 'evaluation/test/loss'


class _ProgressReleaseManager(tff.program.ReleaseManager):
  """Prints one line per round and keeps the history for the plot."""

  def __init__(self, total_rounds: int):
    self._total = total_rounds
    self.history: dict[int, dict[str, float]] = {}

  async def release(self, value: Any, key: int) -> None:
    flat = {'/'.join(path): float(v) for path, v in _flatten(value)}
    self.history[key] = flat
    parts = [f'round {key:4d}/{self._total}']
    if 'client_work/train/loss' in flat:
      parts.append(f"train_loss {flat['client_work/train/loss']:.4f}")
    if _ACCURACY_KEY in flat:
      parts.append(f'test_acc {flat[_ACCURACY_KEY]:.4f}')
    if 'training_time_in_seconds' in flat:
      parts.append(f"({flat['training_time_in_seconds']:.1f} s)")
    print('  '.join(parts), flush=True)


def _flatten(value: Any, prefix: tuple[str, ...] = ()):
  """Yields (path, scalar) pairs of a nested mapping of numbers."""
  if isinstance(value, (dict, collections.OrderedDict)):
    for k, v in value.items():
      yield from _flatten(v, prefix + (str(k),))
  elif np.ndim(value) == 0:
    yield prefix, value


def _plot(history: dict[int, dict[str, float]], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # No display; write a file.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  rounds = sorted(r for r in history if _ACCURACY_KEY in history[r])
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(rounds, [history[r][_ACCURACY_KEY] for r in rounds], marker='.')
  ax.axhline(0.1, color='gray', linestyle=':', label='chance')
  ax.set_xlabel('round')
  ax.set_ylabel('test accuracy')
  ax.set_ylim(0, 1)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run() -> dict[str, Any]:
  """Trains and writes the outputs; returns the summary."""
  validate_flags()
  start = time.time()
  output_dir = _OUTPUT_DIR.value
  os.makedirs(output_dir, exist_ok=True)
  tf.random.set_seed(_SEED.value)

  # LeNet is defined on 32x32 inputs (BAFFLE); WRN's stride-2 stages also
  # divide 32 evenly. The linear model needs no padding.
  train, test, image_shape = _load_data(pad=_MODEL.value != 'linear')
  net = models.get_net(_MODEL.value, image_shape)
  model = models.to_functional_model(net, image_shape, seed=_SEED.value)

  if _AGGREGATOR.value == 'dp':
    aggregator = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=_DP_NOISE.value, clients_per_round=float(
            _CLIENTS_PER_ROUND.value), clip=_DP_CLIP.value)
  else:
    aggregator = tff.aggregators.MeanFactory()
  server_optimizer = (tff.learning.optimizers.build_adam(_LR.value)
                      if _MODE.value == 'fedsgd'
                      else tff.learning.optimizers.build_sgdm(_LR.value))
  hparams = dict(
      num_perturbations=_K.value, sigma=_SIGMA.value,
      estimator=_ESTIMATOR.value, mode=_MODE.value,
      clip_value=_CLIP.value or None,
      client_learning_rate=_CLIENT_LR.value,
      parallel_perturbations=_PARALLEL.value)
  process = baffle.build_baffle(
      model, server_optimizer=server_optimizer, model_aggregator=aggregator,
      ema_decay=_EMA.value or None, seed=_SEED.value, **hparams)
  upload = baffle.upload_bytes(
      baffle.build_client_work(model, **hparams))

  client_ids = list(train.client_ids)

  def select_clients(round_num: int) -> list[tf.data.Dataset]:
    rng = np.random.default_rng([_SEED.value, round_num])
    chosen = rng.choice(len(client_ids), _CLIENTS_PER_ROUND.value,
                        replace=False)
    datasets = []
    for i in chosen:
      ds = train.create_tf_dataset_for_client(client_ids[i]).shuffle(
          1000, seed=_SEED.value * 100_003 + round_num).batch(
              _BATCH_SIZE.value)
      # fedsgd uses one minibatch per client and round.
      datasets.append(ds.take(1) if _MODE.value == 'fedsgd' else ds)
    return datasets

  test_x = tf.constant(test['x'])
  test_y = tf.constant(test['y'])

  @tf.function
  def evaluate_weights(trainable):
    logits = tf.concat([net.apply(trainable, test_x[i:i + 500])
                        for i in range(0, int(test_x.shape[0]), 500)], 0)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(
        tf.argmax(logits, -1, output_type=tf.int32), test_y), tf.float32))
    return accuracy, models.sparse_softmax_loss(logits, test_y)

  def evaluate(state, unused_data) -> collections.OrderedDict:
    weights = process.get_model_weights(state)
    accuracy, loss = evaluate_weights([tf.constant(w) for w in
                                       weights.trainable])
    return collections.OrderedDict(test=collections.OrderedDict(
        accuracy=float(accuracy), loss=float(loss)))

  progress = _ProgressReleaseManager(_ROUNDS.value)
  managers = [
      tff.program.CSVFileReleaseManager(
          os.path.join(output_dir, 'metrics.csv'),
          save_mode=tff.program.CSVSaveMode.WRITE, key_fieldname='round'),
      tff.program.TensorBoardReleaseManager(
          os.path.join(output_dir, 'tensorboard')),
      progress,
  ]
  print(f'BAFFLE: {_MODEL.value} ({net.num_params:,} params) on '
        f'{_DATASET.value}, K={_K.value}, estimator={_ESTIMATOR.value}, '
        f'mode={_MODE.value}, {_ROUNDS.value} rounds x '
        f'{_CLIENTS_PER_ROUND.value} clients; upload {upload} bytes per '
        'client per round', flush=True)
  state = tff.simulation.run_training_process(
      process, select_clients, _ROUNDS.value,
      evaluation_fn=evaluate, evaluation_selection_fn=lambda _: None,
      rounds_per_evaluation=_EVAL_EVERY.value, metrics_managers=managers)
  final = evaluate(state, None)['test']
  if _ROUNDS.value % _EVAL_EVERY.value:  # The loop did not evaluate it.
    progress.history.setdefault(_ROUNDS.value, {}).update(
        {_ACCURACY_KEY: final['accuracy'], _LOSS_KEY: final['loss']})

  plot_path = os.path.join(output_dir, 'accuracy.png')
  _plot(progress.history, plot_path,
        f'BAFFLE {_ESTIMATOR.value}, K={_K.value}, {_MODEL.value}')
  summary = collections.OrderedDict(
      final_test_accuracy=final['accuracy'],
      final_test_loss=final['loss'],
      rounds=_ROUNDS.value,
      upload_bytes_per_client_per_round=upload,
      upload_scalars_per_client_per_round=(
          _K.value if _MODE.value == 'fedsgd' else net.num_params),
      num_params=net.num_params,
      test_examples=int(test['y'].shape[0]),
      accuracy_by_round={str(r): h[_ACCURACY_KEY] for r, h in
                         sorted(progress.history.items())
                         if _ACCURACY_KEY in h},
      wall_time_seconds=round(time.time() - start, 1),
      flags={f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(
          sys.modules[__name__])})
  with open(os.path.join(output_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(f"Final test accuracy: {final['accuracy']:.4f} (after "
        f'{_ROUNDS.value} rounds, {summary["wall_time_seconds"]} s)')
  print(f'Outputs written to {os.path.abspath(output_dir)}: metrics.csv, '
        'tensorboard/, accuracy.png, summary.json')
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # TFF's training loop logs several INFO lines per round; the progress
    # lines below say the same in one.
    logging.set_verbosity(logging.WARNING)
  try:
    run()
  except fad_data.EmnistUnavailableError as e:
    # A user-facing condition with instructions, not a bug: no traceback.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  finally:
    tff_fad.runtime.shutdown_local_workers()


if __name__ == '__main__':
  app.run(main)
