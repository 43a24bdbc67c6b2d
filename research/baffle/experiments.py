r"""BAFFLE against backprop baselines, same seeds, rounds, clients and data.

Every run uses the shared flags (--rounds, --clients_per_round,
--num_clients, --dirichlet_alpha, --batch_size, --model, --seed, ...) with
research/baffle/main.py's defaults, so all runs see the same digits split,
the same clients in each round (`default_rng([seed, round])`) and the same
shuffled batches:

  * BAFFLE, `research.baffle.main.run()` for each K in --Ks and estimator in
    --estimators (mode 'fedsgd': one minibatch per client per round, server
    Adam with --lr, elementwise clip --clip).
  * FedSGD: `tff.learning.algorithms.build_fed_sgd` on the same single
    minibatch per client and round (its exact backprop gradient), server
    Adam with the same --lr and no clipping.
  * FedAvg: `tff.learning.algorithms.build_weighted_fed_avg`, one local epoch
    of client SGD (--client_lr) over the client's whole shuffled data, server
    SGD with rate 1.0.

All runs go through the binaries' loop (`experiment.train`), client sampler
and evaluation. Test accuracy is that of `process.get_model_weights(state)`
on the held-out test set (central), evaluated every --eval_every rounds and
at the last round. Upload
is `tff_fad.communication_cost(process.next, clients_per_round)
.client_to_server_bytes_per_client`: every byte a client sends up in one
round (the update, the aggregation weight and the metrics).

Writes table.md and table.json (and each run's outputs) to --output_dir:

  python -m research.baffle.experiments --rounds 100 --output_dir out/baffle
"""

import collections
import json
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from absl.testing import flagsaver
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from research import experiment
from research import run_dir
from research.baffle import main as baffle_main
from tff_fad.learning import baffle

_KS = flags.DEFINE_list('Ks', ['100', '500'], 'Numbers of perturbations.')
_ESTIMATORS = flags.DEFINE_list('estimators', list(baffle.ESTIMATORS),
                                'BAFFLE estimators to run.')
_BASELINES = flags.DEFINE_list('baselines', ['fedsgd', 'fedavg'],
                               'Backprop baselines to run.')
_REPORT_ROUNDS = flags.DEFINE_list(
    'report_rounds', [], 'Rounds whose accuracy gets a column (each must be '
    'evaluated: a multiple of --eval_every); default: every evaluation.')

BASELINES = ('fedsgd', 'fedavg')


def _baseline_process(algorithm: str, model):
  if algorithm == 'fedsgd':
    return tff.learning.algorithms.build_fed_sgd(
        model, server_optimizer_fn=tff.learning.optimizers.build_adam(
            baffle_main._LR.value))  # pylint: disable=protected-access
  return tff.learning.algorithms.build_weighted_fed_avg(
      model,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(
          experiment.CLIENT_LR.value),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))


def run_baseline(algorithm: str, output_dir: str) -> dict[str, Any]:
  """Trains a backprop baseline on BAFFLE's data and clients; a summary.

  Through the binaries' own loop (`experiment.train`, TFF's
  `run_training_process`), sampler and evaluation, so only the algorithm
  differs from the BAFFLE runs.
  """
  start = time.time()
  seed = experiment.SEED.value
  tf.random.set_seed(seed)
  task = experiment.load_task(
      pad_digits_to_32x32=experiment.MODEL.value != 'linear')
  process = _baseline_process(algorithm, task.model)
  select = experiment.client_selector(
      task, clients_per_round=experiment.CLIENTS_PER_ROUND.value, seed=seed,
      batches_per_client=1 if algorithm == 'fedsgd' else None)
  evaluate_weights = experiment.evaluator(task, experiment.EVAL_CLIENTS.value)

  def evaluate(state, unused_data):
    return evaluate_weights(process.get_model_weights(state))

  rounds = experiment.ROUNDS.value
  os.makedirs(output_dir, exist_ok=True)
  with run_dir.lock(output_dir):
    state, _ = experiment.train(
        process, select, output_dir=output_dir, rounds=rounds,
        evaluate=evaluate, eval_every=experiment.EVAL_EVERY.value,
        progress=experiment.ProgressReleaseManager(rounds, [
            ('train_loss', 'client_work/train/loss', '.4f'),
            ('test_acc', experiment.CENTRAL_ACCURACY_KEY, '.4f')]),
        flag_values=dict(experiment.flag_values(baffle_main.__name__),
                         baseline=algorithm))
    _, test_summary = experiment.final_evaluation(
        evaluate(state, None), experiment.read_metrics(output_dir), rounds)
  print(f'{algorithm}: final test accuracy '
        f'{test_summary["final_test_accuracy"]:.4f}', flush=True)
  return collections.OrderedDict(
      final_test_accuracy=test_summary['final_test_accuracy'],
      accuracy_by_round=test_summary['accuracy_by_round'],
      upload_bytes=tff_fad.communication_cost(
          process.next, experiment.CLIENTS_PER_ROUND.value
      ).client_to_server_bytes_per_client,
      wall_time_seconds=round(time.time() - start, 1))


def make_table(rows: Sequence[dict], report_rounds: Sequence[int]) -> str:
  """The markdown table of `rows` (dicts as written to table.json)."""
  header = ['method', 'K', 'estimator', 'final test accuracy'] + [
      f'acc @ round {r}' for r in report_rounds] + [
          'upload bytes / client / round', 'wall time (s)']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for row in rows:
    accs = [row['accuracy_by_round'].get(str(r)) for r in report_rounds]
    cells = [row['method'], str(row['K'] or '-'), row['estimator'] or '-',
             f"{row['final_test_accuracy']:.4f}"] + [
                 '-' if a is None else f'{a:.4f}' for a in accs] + [
                     f"{row['upload_bytes']:,}",
                     f"{row['wall_time_seconds']:.0f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tff_fad.runtime.set_up_entry_point()  # No signal leaks TFF's worker.
  output_dir = experiment.OUTPUT_DIR.value
  if not output_dir:
    raise ValueError('--output_dir is required.')
  for name in _ESTIMATORS.value:
    if name not in baffle.ESTIMATORS:
      raise ValueError(f'--estimators: {name!r} is not one of '
                       f'{baffle.ESTIMATORS}.')
  for name in _BASELINES.value:
    if name not in BASELINES:
      raise ValueError(f'--baselines: {name!r} is not one of {BASELINES}.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  rows = []
  try:
    for k in [int(k) for k in _KS.value]:
      for estimator in _ESTIMATORS.value:
        run_dir = os.path.join(output_dir, f'baffle_K{k}_{estimator}')
        with flagsaver.flagsaver(K=k, estimator=estimator, mode='fedsgd',
                                 output_dir=run_dir):
          summary = baffle_main.run()
        rows.append(collections.OrderedDict(
            method='BAFFLE', K=k, estimator=estimator,
            final_test_accuracy=summary['final_test_accuracy'],
            accuracy_by_round=summary['accuracy_by_round'],
            upload_bytes=summary['upload_bytes_per_client_per_round'],
            wall_time_seconds=summary['wall_time_seconds']))
    for algorithm in _BASELINES.value:
      summary = run_baseline(algorithm, os.path.join(output_dir, algorithm))
      rows.append(collections.OrderedDict(
          method={'fedsgd': 'FedSGD (backprop)',
                  'fedavg': 'FedAvg (backprop, 1 epoch)'}[algorithm],
          K=None, estimator=None, **summary))
    if _REPORT_ROUNDS.value:
      report_rounds = [int(r) for r in _REPORT_ROUNDS.value]
    else:
      report_rounds = sorted({int(r) for row in rows
                              for r in row['accuracy_by_round']} - {0})
    table = make_table(rows, report_rounds)
    caption = (
        f'{experiment.MODEL.value} on {experiment.TASK.value}, '
        f'{experiment.ROUNDS.value} rounds x '
        f'{experiment.CLIENTS_PER_ROUND.value} of '
        f'{experiment.NUM_CLIENTS.value} clients, batch '
        f'{experiment.BATCH_SIZE.value}, alpha '
        f'{experiment.DIRICHLET_ALPHA.value}, seed {experiment.SEED.value}')
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'table.md'), 'w') as f:
      f.write(caption + '\n\n' + table + '\n')
    with open(os.path.join(output_dir, 'table.json'), 'w') as f:
      json.dump(dict(caption=caption, rows=rows), f, indent=2)
    print(caption)
    print(table)
  finally:
    tff_fad.runtime.shutdown_local_workers()


if __name__ == '__main__':
  app.run(main)
