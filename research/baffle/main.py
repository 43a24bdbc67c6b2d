r"""Trains a model with BAFFLE (forward-only federated learning).

Runs on the embedded offline digits by default:

  python -m research.baffle.main --output_dir /tmp/baffle

writes `metrics.csv` (one row per round), `tensorboard/`, `accuracy.png` and
`summary.json` (final test accuracy, upload bytes per client per round, flags)
to `--output_dir`, and prints progress and the final accuracy.
"""

import collections
import os
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from research import experiment
from research import run_dir
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
_PARALLEL = flags.DEFINE_integer('parallel_perturbations', 1,
                                 'Perturbations evaluated concurrently.')

experiment.set_flag_defaults(
    rounds=200, clients_per_round=5, num_clients=20, dirichlet_alpha='0.5',
    batch_size=32, client_lr=0.05, dp_clip=10.0, eval_every=20)
_ROUNDS = experiment.ROUNDS
_CLIENTS_PER_ROUND = experiment.CLIENTS_PER_ROUND
_NUM_CLIENTS = experiment.NUM_CLIENTS
_DIRICHLET_ALPHA = experiment.DIRICHLET_ALPHA
_BATCH_SIZE = experiment.BATCH_SIZE
_CLIENT_LR = experiment.CLIENT_LR
_AGGREGATOR = experiment.AGGREGATOR
_DP_NOISE = experiment.DP_NOISE
_DP_CLIP = experiment.DP_CLIP
_MODEL = experiment.MODEL
_EVAL_EVERY = experiment.EVAL_EVERY
_SEED = experiment.SEED
_OUTPUT_DIR = experiment.OUTPUT_DIR


def _positive(flag: flags.FlagHolder, allow_zero: bool = False) -> None:
  ok = flag.value >= 0 if allow_zero else flag.value > 0
  if not ok:
    raise ValueError(f'--{flag.name} must be {">= 0" if allow_zero else "> 0"}'
                     f', got {flag.value}.')


def validate_flags() -> None:
  """Raises ValueError naming the first bad flag."""
  if not _OUTPUT_DIR.value:
    raise ValueError('--output_dir is required.')
  for flag in (_K, _SIGMA, _ROUNDS, _CLIENTS_PER_ROUND, _NUM_CLIENTS,
               _BATCH_SIZE, _LR, _CLIENT_LR, _EVAL_EVERY, _PARALLEL,
               _DP_CLIP):
    _positive(flag)
  for flag in (_CLIP, _DP_NOISE):
    _positive(flag, allow_zero=True)
  if not 0.0 <= _EMA.value < 1.0:
    raise ValueError(f'--ema must be in [0, 1), got {_EMA.value}.')
  if experiment.TASK.value == 'digits' and (
      _CLIENTS_PER_ROUND.value > _NUM_CLIENTS.value):
    raise ValueError(f'--clients_per_round ({_CLIENTS_PER_ROUND.value}) must '
                     f'be <= --num_clients ({_NUM_CLIENTS.value}).')
  experiment.validate_task_flags()
  experiment.validate_execution_flags()


def _plot(history: dict[int, dict[str, float]], key: str, path: str,
          title: str) -> None:
  rounds = sorted(r for r in history if key in history[r])
  experiment.plot_series(path, title, [dict(
      rounds=rounds, values=[history[r][key] for r in rounds],
      ylabel='test accuracy', ylim=(0, 1), hlines=[(0.1, 'chance')])])


def run() -> dict[str, Any]:
  """Trains and writes the outputs; returns the summary."""
  validate_flags()
  with run_dir.lock(_OUTPUT_DIR.value):
    return _run()


def _run() -> dict[str, Any]:
  start = time.time()
  output_dir = _OUTPUT_DIR.value
  tf.random.set_seed(_SEED.value)

  # LeNet is defined on 32x32 inputs (BAFFLE); WRN's stride-2 stages also
  # divide 32 evenly. The linear model needs no padding.
  task = experiment.load_task(pad_digits_to_32x32=_MODEL.value != 'linear')
  model = task.model

  if _AGGREGATOR.value == 'dp':
    aggregator = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=_DP_NOISE.value, clients_per_round=float(
            _CLIENTS_PER_ROUND.value), clip=_DP_CLIP.value)
  else:
    aggregator = tff.aggregators.MeanFactory()
  server_optimizer = (tff.learning.optimizers.build_adam(_LR.value)
                      if _MODE.value == 'fedsgd'
                      else tff.learning.optimizers.build_sgdm(_LR.value))
  process = baffle.build_baffle(
      model, tff.learning.optimizers.build_sgdm(_CLIENT_LR.value),
      server_optimizer, model_aggregator=aggregator,
      num_perturbations=_K.value, sigma=_SIGMA.value,
      estimator=_ESTIMATOR.value, mode=_MODE.value,
      clip_value=_CLIP.value or None, ema_decay=_EMA.value or None,
      parallel_perturbations=_PARALLEL.value, seed=_SEED.value)
  # Every byte a client sends in a round: its scores (or update), the
  # aggregation weight and the metrics' sums.
  upload = tff_fad.communication_cost(
      process.next, _CLIENTS_PER_ROUND.value).client_to_server_bytes_per_client

  # fedsgd uses one minibatch per client and round.
  select_clients = experiment.client_selector(
      task, clients_per_round=_CLIENTS_PER_ROUND.value, seed=_SEED.value,
      batches_per_client=1 if _MODE.value == 'fedsgd' else None)
  evaluate_weights = experiment.evaluator(task, experiment.EVAL_CLIENTS.value)

  def evaluate(state, unused_data) -> collections.OrderedDict:
    return evaluate_weights(process.get_model_weights(state))

  progress = experiment.ProgressReleaseManager(_ROUNDS.value, [
      ('train_loss', 'client_work/train/loss', '.4f'),
      ('estimate_norm', 'gradient_estimate/norm', '.3f'),
      ('test_acc', experiment.CENTRAL_ACCURACY_KEY, '.4f'),
      ('fed_test_acc', 'evaluation/federated/accuracy', '.4f'),
  ])
  print(f'BAFFLE: {task.description}, K={_K.value}, '
        f'estimator={_ESTIMATOR.value}, '
        f'mode={_MODE.value}, {_ROUNDS.value} rounds x '
        f'{_CLIENTS_PER_ROUND.value} clients; upload {upload} bytes per '
        'client per round', flush=True)
  state, resumed_from = experiment.train(
      process, select_clients, output_dir=output_dir, rounds=_ROUNDS.value,
      evaluate=evaluate, eval_every=_EVAL_EVERY.value, progress=progress,
      flag_values=experiment.flag_values(__name__))
  history = experiment.read_metrics(output_dir)  # Includes resumed rounds.
  accuracy_key, test_summary = experiment.final_evaluation(
      evaluate(state, None), history, _ROUNDS.value)
  plot_path = os.path.join(output_dir, 'accuracy.png')
  _plot(history, accuracy_key, plot_path,
        f'BAFFLE {_ESTIMATOR.value}, K={_K.value}, {task.description}')
  summary = collections.OrderedDict(
      task=task.description,
      **test_summary,
      rounds=_ROUNDS.value,
      upload_bytes_per_client_per_round=upload,
      upload_scalars_per_client_per_round=(
          _K.value if _MODE.value == 'fedsgd' else task.num_params),
      num_params=task.num_params,
      resumed_from_round=resumed_from,
      wall_time_seconds=round(time.time() - start, 1),
      flags=experiment.flag_values(__name__))
  summary = run_dir.write_summary(output_dir, summary, history)
  print(f"Final test accuracy ({test_summary['test_accuracy_from']}): "
        f"{test_summary['final_test_accuracy']:.4f} (after "
        f'{_ROUNDS.value} rounds, {summary["wall_time_seconds"]} s)')
  print(f'Outputs written to {os.path.abspath(output_dir)}: metrics.csv, '
        'tensorboard/, accuracy.png, summary.json')
  return summary


def main(argv: list[str]) -> None:
  experiment.run_main(run, argv)


if __name__ == '__main__':
  app.run(main)
