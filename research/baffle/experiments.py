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
    Adam with the same --lr and --adam_* and no clipping.
  * FedAvg: `tff.learning.algorithms.build_weighted_fed_avg`, one local epoch
    of --client_optimizer (default SGD) at --client_lr over the client's
    whole shuffled data, server SGD with rate 1.0.

All runs go through the binaries' loop (`experiment.train`), client sampler
and evaluation. Test accuracy is that of `process.get_model_weights(state)`
on the held-out test set (central), evaluated every --eval_every rounds and
at the last round. Upload
is `tff_fad.communication_cost(process.next, clients_per_round)
.client_to_server_bytes_per_client`: every byte a client sends up in one
round (the update, the aggregation weight and the metrics).

Writes table.md and table.json (and each run's outputs) to --output_dir:

  python -m research.baffle.experiments --rounds 100 --output_dir out/baffle

`--experiment=paper` runs the paper's table on the embedded digits instead:
every run of `PAPER_RUNS` (or of --paper_runs) with the official recipe
(`--recipe=paper` of research/baffle/main.py: 10 IID clients all in every
round, batch 32, 20 epochs, ...) and backprop FedSGD and FedAvg with the same
model, data, epochs and optimizers:

  python -m research.baffle.experiments --experiment=paper \
      --output_dir out/baffle_paper

It writes `paper.json` (a list of runs: model, method, K, directions,
estimator, mode, ema, activation, epochs, rounds, final_test_accuracy,
wall_seconds, accuracy by round and, for BAFFLE, the gradient estimate's
cosine to the backprop gradient by epoch), `paper.md` and `paper.png`
(accuracy by epoch) to --output_dir. A BAFFLE run gives two rows: its EMA
weights (`ema: true`) and the raw weights the EMA averages (`ema: false`);
the EMA does not change training. Runs already in --output_dir/paper.json
are kept, not rerun, so the grid can be run in parts.
"""

import collections
import json
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
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

# --experiment: 'estimators' (the default: BAFFLE for each of --Ks and
# --estimators against the baselines) or 'paper' (the paper's table with the
# official recipe, PAPER_RUNS).
EXPERIMENTS = ('estimators', 'paper')
_PAPER_RUNS = flags.DEFINE_list(
    'paper_runs', None, '--experiment=paper: the runs of PAPER_RUNS to run, '
    'by name (default: all).')

BASELINES = ('fedsgd', 'fedavg')

# The paper's table (--experiment=paper): name -> flags on top of
# --recipe=paper (BAFFLE) or the baseline's (method fedsgd|fedavg). The
# recipe is LeNet, K=100, per-client directions, forward differences,
# FedSGD mode, EMA 0.995 per epoch with warm-up, Hardswish, 20 epochs.
PAPER_RUNS = collections.OrderedDict([
    ('baffle_lenet_K100_per_client', dict()),
    ('baffle_lenet_K100_shared', dict(directions='shared')),
    ('baffle_lenet_relu_K100_per_client', dict(activation='relu')),
    ('baffle_lenet_K100_one_epoch', dict(mode='one_epoch')),
    ('baffle_lenet_K500_per_client', dict(K=500)),
    ('baffle_lenet_K500_shared', dict(K=500, directions='shared')),
    ('baffle_wrn_K100_per_client', dict(model='wrn')),
    ('baffle_wrn_K100_shared', dict(model='wrn', directions='shared')),
    ('fedsgd_lenet', dict(method='fedsgd')),
    ('fedavg_lenet', dict(method='fedavg')),
    ('fedsgd_lenet_relu', dict(method='fedsgd', activation='relu')),
    ('fedavg_lenet_relu', dict(method='fedavg', activation='relu')),
    ('fedsgd_wrn', dict(method='fedsgd', model='wrn')),
    ('fedavg_wrn', dict(method='fedavg', model='wrn')),
])


def _baseline_process(algorithm: str, model):
  """TFF's FedSGD (server Adam at --lr with --adam_*) or FedAvg (one local
  epoch of --client_optimizer at --client_lr, server SGD 1.0): BAFFLE's own
  server and local optimizers. TFF's Adam has no weight decay."""
  if algorithm == 'fedsgd':
    return tff.learning.algorithms.build_fed_sgd(
        model, server_optimizer_fn=baffle_main.adam_from_flags(
            baffle_main._LR.value))  # pylint: disable=protected-access
  return tff.learning.algorithms.build_weighted_fed_avg(
      model, client_optimizer_fn=baffle_main.client_optimizer_from_flags(),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))


def run_baseline(algorithm: str, output_dir: str) -> dict[str, Any]:
  """Trains a backprop baseline on BAFFLE's data and clients; a summary.

  Through the binaries' own loop (`experiment.train`, TFF's
  `run_training_process`), sampler and evaluation, so only the algorithm
  differs from the BAFFLE runs.
  """
  start = time.time()
  # The shared flags and the optimizers' (and --recipe's, as BAFFLE's runs).
  baffle_main.validate_flags()
  seed = experiment.SEED.value
  tf.random.set_seed(seed)
  task = experiment.load_task(
      pad_digits_to_32x32=experiment.MODEL.value != 'linear',
      resize_digits=baffle_main._RESIZE_DIGITS.value)  # pylint: disable=protected-access
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
    _, resumed_from, final = experiment.train(
        process, select, output_dir=output_dir, rounds=rounds,
        evaluate=evaluate, eval_every=experiment.EVAL_EVERY.value,
        progress=experiment.ProgressReleaseManager(rounds, [
            ('train_loss', 'client_work/train/loss', '.4f'),
            ('test_acc', experiment.CENTRAL_ACCURACY_KEY, '.4f')]),
        flag_values=dict(experiment.flag_values(baffle_main.__name__),
                         baseline=algorithm))
    history = experiment.read_metrics(output_dir)
    _, test_summary = experiment.final_evaluation(final, history, rounds)
  print(f'{algorithm}: final test accuracy '
        f'{test_summary["final_test_accuracy"]:.4f}', flush=True)
  return collections.OrderedDict(
      final_test_accuracy=test_summary['final_test_accuracy'],
      accuracy_by_round=test_summary['accuracy_by_round'],
      upload_bytes=tff_fad.communication_cost(
          process.next, experiment.CLIENTS_PER_ROUND.value
      ).client_to_server_bytes_per_client,
      **experiment.wall_time(start, history, resumed_from))


def _paper_row(name: str, *, method: str, rounds: int,
               final_test_accuracy: float, accuracy_by_round: dict,
               wall_seconds: float, **details) -> collections.OrderedDict:
  """One row of paper.json: the fields every row has (None where one does
  not apply), then `details`, then the accuracy by round."""
  row = collections.OrderedDict(
      run=name, model=experiment.MODEL.value, method=method, K=None,
      directions=None, estimator=None, mode=None, ema=None,
      activation=experiment.ACTIVATION.value,
      epochs=baffle_main._EPOCHS.value,  # pylint: disable=protected-access
      rounds=rounds, final_test_accuracy=final_test_accuracy,
      wall_seconds=wall_seconds)
  row.update(details)
  row['accuracy_by_round'] = accuracy_by_round
  return row


def _paper_run_flags(name: str, output_dir: str) -> tuple[str, dict]:
  """A PAPER_RUNS entry's method and the flag values its run trains with."""
  values = dict(PAPER_RUNS[name])
  method = values.pop('method', 'baffle')
  return method, dict(recipe='paper', output_dir=os.path.join(output_dir, name),
                      **values)


def run_paper_grid(output_dir: str, names: Sequence[str]) -> list[dict]:
  """Runs `names` of PAPER_RUNS not yet in `<output_dir>/paper.json`.

  Each run is written to paper.json as soon as it ends. Returns all rows.
  """
  # pylint: disable=protected-access
  results_path = os.path.join(output_dir, 'paper.json')
  rows = []
  if os.path.exists(results_path):
    with open(results_path) as f:
      rows = json.load(f)
  done = {row['run'] for row in rows}
  for name in names:
    if name in done:
      print(f'{name}: in {results_path}, not rerun', flush=True)
      continue
    method, values = _paper_run_flags(name, output_dir)
    run_dir_path = values['output_dir']
    with flagsaver.flagsaver(**values):
      baffle_main.apply_recipe()
      task = experiment.load_task(
          pad_digits_to_32x32=True,
          resize_digits=baffle_main._RESIZE_DIGITS.value)
      if method == 'baffle':
        per_epoch = baffle_main.rounds_per_epoch_of(task)
        with flagsaver.flagsaver(log_gradient_cosine=True,
                                 eval_every=per_epoch):
          summary = baffle_main.run()
        common = dict(
            method='baffle', rounds=summary['rounds'], K=baffle_main._K.value,
            directions=('per_client' if baffle_main._MODE.value == 'one_epoch'
                        else baffle_main._DIRECTIONS.value),
            estimator=baffle_main._ESTIMATOR.value,
            mode=baffle_main._MODE.value, rounds_per_epoch=per_epoch,
            upload_bytes=summary['upload_bytes_per_client_per_round'],
            gradient_cosine_by_round=summary['gradient_cosine_by_round'],
            predicted_gradient_cosine_by_round=summary[
                'predicted_gradient_cosine_by_round'],
            expected_gradient_cosine=summary['expected_gradient_cosine'])
        for ema, suffix in ((True, ''), (False, '_without_ema')):
          rows.append(_paper_row(
              name, ema=ema,
              final_test_accuracy=summary['final_test_accuracy' + suffix],
              accuracy_by_round=summary['accuracy_by_round' + suffix],
              wall_seconds=summary['wall_time_seconds'], **common))
      else:
        with flagsaver.flagsaver(mode='fedsgd'):
          per_epoch = (baffle_main.rounds_per_epoch_of(task)
                       if method == 'fedsgd' else 1)
        rounds = baffle_main._EPOCHS.value * per_epoch
        with flagsaver.flagsaver(rounds=rounds, eval_every=per_epoch):
          summary = run_baseline(method, run_dir_path)
        rows.append(_paper_row(
            name, method=method, rounds=rounds,
            final_test_accuracy=summary['final_test_accuracy'],
            accuracy_by_round=summary['accuracy_by_round'],
            wall_seconds=summary['wall_time_seconds'],
            rounds_per_epoch=per_epoch, upload_bytes=summary['upload_bytes']))
    with open(results_path + '.tmp', 'w') as f:
      json.dump(rows, f, indent=1)
    os.replace(results_path + '.tmp', results_path)
  return rows


def make_paper_table(rows: Sequence[dict]) -> str:
  """The markdown table of paper.json's rows."""
  header = ['model', 'method', 'K', 'directions', 'mode', 'EMA', 'activation',
            'epochs (rounds)', 'final test accuracy', 'best (epoch)',
            'estimate cosine: measured / predicted / one gradient',
            'upload B / client / round',
            'wall time (s)']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  dash = lambda v: '-' if v is None else str(v)
  methods = ('baffle', 'fedsgd', 'fedavg')
  # Grouped by model and activation; BAFFLE first, EMA on before off.
  order = lambda row: (row['model'], row['activation'] != 'hardswish',
                       row['activation'], methods.index(row['method']),
                       row['mode'] or '', row['K'] or 0,
                       row['directions'] or '', row['ema'] is False)
  for row in sorted(rows, key=order):
    by_round = {int(r): a for r, a in row['accuracy_by_round'].items()}
    best_round = max(by_round, key=lambda r: (by_round[r], -r))
    # Means over the run's measurements (one per epoch).
    cosines = list(row.get('gradient_cosine_by_round', {}).values())
    predicted = list(row.get('predicted_gradient_cosine_by_round',
                             {}).values())
    cosine = '-' if not cosines else ' / '.join([
        f'{np.mean(cosines):.3f}',
        f'{np.mean(predicted):.3f}' if predicted else '-',
        f"{row['expected_gradient_cosine']:.3f}"])
    cells = [row['model'], row['method'], dash(row['K']),
             dash(row['directions']), dash(row['mode']),
             {None: '-', True: 'on', False: 'off'}[row['ema']],
             row['activation'], f"{row['epochs']} ({row['rounds']})",
             f"{row['final_test_accuracy']:.4f}",
             f"{by_round[best_round]:.4f} "
             f"({best_round // row['rounds_per_epoch']})",
             cosine, f"{row['upload_bytes']:,}",
             f"{row['wall_seconds']:.0f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_paper(rows: Sequence[dict], path: str) -> None:
  """Test accuracy by epoch, a panel per model and activation; a colour per
  run, its EMA weights solid and raw weights dotted."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # No display; write a file.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = list(dict.fromkeys((r['model'], r['activation']) for r in rows))
  runs = list(dict.fromkeys(r['run'] for r in rows))
  colours = dict(zip(runs, plt.get_cmap('tab10' if len(runs) <= 10
                                        else 'tab20').colors))
  fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5),
                           squeeze=False)
  for ax, (model, activation) in zip(axes[0], panels):
    for row in rows:
      if (row['model'], row['activation']) != (model, activation):
        continue
      points = sorted((int(r) / row['rounds_per_epoch'], a)
                      for r, a in row['accuracy_by_round'].items())
      if row['method'] == 'baffle':
        label = (f"BAFFLE K={row['K']} {row['directions']}"
                 + (' one-epoch' if row['mode'] == 'one_epoch' else '')
                 + (', EMA' if row['ema'] else ', raw weights'))
      else:
        label = f"{row['method']} (backprop)"
      ax.plot(*zip(*points), marker='.', label=label,
              color=colours[row['run']],
              linestyle=':' if row['ema'] is False else '-')
    ax.axhline(0.1, color='gray', linestyle=':')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy')
    ax.set_ylim(0, 1)
    ax.set_title(f'{model} ({activation}), embedded digits, 10 IID clients')
    ax.legend(fontsize=7, loc='upper left')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def paper_main(output_dir: str) -> None:
  names = _PAPER_RUNS.value or list(PAPER_RUNS)
  for name in names:
    if name not in PAPER_RUNS:
      raise experiment.FlagError(f'--paper_runs: {name!r} is not one of '
                                 f'{list(PAPER_RUNS)}.')
  experiment.validate_runs(
      baffle_main.validate_flags,
      [_paper_run_flags(name, output_dir)[1] for name in names])
  os.makedirs(output_dir, exist_ok=True)
  rows = run_paper_grid(output_dir, names)
  table = make_paper_table(rows)
  with open(os.path.join(output_dir, 'paper.md'), 'w') as f:
    f.write(table + '\n')
  plot_paper(rows, os.path.join(output_dir, 'paper.png'))
  print(table)


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
  experiment.run_main(run_experiment, argv, grid=True)


def run_experiment() -> None:
  """--experiment=estimators or paper, into --output_dir."""
  output_dir = experiment.required_output_dir()
  which = experiment.experiment_name(EXPERIMENTS)
  for name in _ESTIMATORS.value:
    if name not in baffle.ESTIMATORS:
      raise experiment.FlagError(f'--estimators: {name!r} is not one of '
                                 f'{baffle.ESTIMATORS}.')
  for name in _BASELINES.value:
    if name not in BASELINES:
      raise experiment.FlagError(
          f'--baselines: {name!r} is not one of {BASELINES}.')
  if which == 'paper':
    paper_main(output_dir)
    return
  ks = experiment.parse_numbers(_KS, int)
  report_rounds = experiment.parse_numbers(_REPORT_ROUNDS, int)
  baffle_runs = [
      dict(K=k, estimator=estimator, mode='fedsgd',
           output_dir=os.path.join(output_dir, f'baffle_K{k}_{estimator}'))
      for k in ks for estimator in _ESTIMATORS.value]
  # {}: the baselines' flags (under a flagsaver, as validate_flags applies
  # --recipe).
  experiment.validate_runs(baffle_main.validate_flags, baffle_runs + [{}])
  rows = []
  for values in baffle_runs:
    with flagsaver.flagsaver(**values):
      summary = baffle_main.run()
    rows.append(collections.OrderedDict(
        method='BAFFLE', K=values['K'], estimator=values['estimator'],
        final_test_accuracy=summary['final_test_accuracy'],
        accuracy_by_round=summary['accuracy_by_round'],
        upload_bytes=summary['upload_bytes_per_client_per_round'],
        wall_time_seconds=summary['wall_time_seconds'],
        wall_time_seconds_before_resuming=summary[
            'wall_time_seconds_before_resuming']))
  for algorithm in _BASELINES.value:
    with flagsaver.flagsaver():  # run_baseline applies --recipe.
      summary = run_baseline(algorithm, os.path.join(output_dir, algorithm))
    rows.append(collections.OrderedDict(
        method={'fedsgd': 'FedSGD (backprop)',
                'fedavg': 'FedAvg (backprop, 1 epoch)'}[algorithm],
        K=None, estimator=None, **summary))
  if not report_rounds:
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


if __name__ == '__main__':
  app.run(main)
