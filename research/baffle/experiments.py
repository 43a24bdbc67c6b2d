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

`--experiment=budget` runs `BUDGET_RUNS` on `--recipe=budget` (LeNet, a
forward-pass budget per client spent on many cheap rounds) and backprop
FedSGD and FedAvg for the rounds the budget pays BAFFLE:

  python -m research.baffle.experiments --experiment=budget \
      --output_dir out/baffle_budget

It writes `budget.json` (the paper table's fields plus
`forward_passes_per_client`, `backward_passes_per_client`, `optimizer`,
`lr`, `schedule` and `train_accuracy`: the clients' accuracy on their own
batches over the last epoch of rounds), `budget.md` and `budget.png` (test
accuracy against passes per client, log x). Finished runs are kept the same
way; a stopped run resumes from its last save in its directory.
"""

import collections
import json
import os
import time
from typing import Any, Callable, Sequence

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
# --estimators against the baselines), 'paper' (the paper's table with the
# official recipe, PAPER_RUNS) or 'budget' (forward-pass budgets,
# BUDGET_RUNS).
EXPERIMENTS = ('estimators', 'paper', 'budget')
_PAPER_RUNS = flags.DEFINE_list(
    'paper_runs', None, '--experiment=paper|budget: the runs of PAPER_RUNS '
    '(or BUDGET_RUNS) to run, by name (default: all).')

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


def _rounds_paid_by(budget: int, num_perturbations: int = 10,
                    estimator: str = 'central') -> int:
  """BAFFLE FedSGD rounds a client's forward-pass budget pays for."""
  return budget // baffle.forward_passes_per_step(estimator,
                                                  num_perturbations)


# --experiment=budget: BAFFLE on LeNet at a fixed forward-pass budget per
# client, on top of --recipe=budget (K=10 central, server Adam beta_1 0.97
# at 1e-2 with cosine decay, shared directions, 10 IID clients): the
# optimizer and the directions varied at the budget of the paper table's
# K=100 row (26,000 passes) and the best at its K=500 row's (130,000); and
# backprop FedSGD and FedAvg for the rounds the budget pays BAFFLE.
BUDGET_RUNS = collections.OrderedDict([
    ('baffle_shared_adam_cosine_26k', dict(forward_passes=26_000,
                                           eval_every=130)),
    ('baffle_shared_adam_constant_26k', dict(
        forward_passes=26_000, eval_every=130, lr_schedule='constant',
        adam_beta1=0.9)),
    ('baffle_per_client_adam_cosine_26k', dict(
        forward_passes=26_000, eval_every=130, directions='per_client')),
    ('baffle_shared_adam_cosine_130k', dict(forward_passes=130_000)),
    ('baffle_per_client_adam_cosine_130k', dict(
        forward_passes=130_000, directions='per_client')),
    ('fedsgd_26k_rounds', dict(method='fedsgd', rounds=_rounds_paid_by(
        26_000), eval_every=130)),
    ('fedavg_26k_rounds', dict(method='fedavg', rounds=_rounds_paid_by(
        26_000), eval_every=130)),
])


def _baseline_process(algorithm: str, model):
  """TFF's FedSGD (BAFFLE's server optimizer: --optimizer at --lr,
  --lr_schedule over --rounds) or FedAvg (one local epoch of
  --client_optimizer at --client_lr, server SGD 1.0): BAFFLE's own server
  and local optimizers. TFF's Adam has no weight decay."""
  if algorithm == 'fedsgd':
    return tff.learning.algorithms.build_fed_sgd(
        model, server_optimizer_fn=baffle_main.server_optimizer_from_flags(
            experiment.ROUNDS.value))
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
      # FedAvg's round is a local epoch; FedSGD's a batch per client.
      final_train_accuracy=baffle_main.train_accuracy(
          history, rounds, 1 if algorithm == 'fedavg' else
          baffle_main.rounds_per_epoch_of(task)),
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


def _grid_runs(grid: str) -> collections.OrderedDict:
  """--experiment=paper|budget's runs (looked up when called)."""
  return {'paper': PAPER_RUNS, 'budget': BUDGET_RUNS}[grid]


def _run_flags(grid: str, name: str, output_dir: str) -> tuple[str, dict]:
  """A run of `grid`'s method and the flag values it trains with: its
  entry on top of `--recipe=<grid>`."""
  values = dict(_grid_runs(grid)[name])
  method = values.pop('method', 'baffle')
  return method, dict(recipe=grid, output_dir=os.path.join(output_dir, name),
                      **values)


def _run_grid(results_path: str, names: Sequence[str],
              run_rows: Callable[[str], list[dict]]) -> list[dict]:
  """Runs each of `names` not yet in the JSON list at `results_path`
  (`run_rows(name)` gives its rows), writing the list after each run.
  Returns all rows."""
  rows = []
  if os.path.exists(results_path):
    with open(results_path) as f:
      rows = json.load(f)
  done = {row['run'] for row in rows}
  for name in names:
    if name in done:
      print(f'{name}: in {results_path}, not rerun', flush=True)
      continue
    rows.extend(run_rows(name))
    with open(results_path + '.tmp', 'w') as f:
      json.dump(rows, f, indent=1)
    os.replace(results_path + '.tmp', results_path)
  return rows


def _paper_rows(name: str, output_dir: str) -> list[dict]:
  """The paper.json rows of one run of PAPER_RUNS (two for BAFFLE: its EMA
  and raw weights)."""
  # pylint: disable=protected-access
  rows = []
  method, values = _run_flags('paper', name, output_dir)
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
      with flagsaver.flagsaver(rounds=rounds, epochs=0, eval_every=per_epoch):
        summary = run_baseline(method, run_dir_path)
      rows.append(_paper_row(
          name, method=method, rounds=rounds,
          final_test_accuracy=summary['final_test_accuracy'],
          accuracy_by_round=summary['accuracy_by_round'],
          wall_seconds=summary['wall_time_seconds'],
          rounds_per_epoch=per_epoch, upload_bytes=summary['upload_bytes']))
  return rows


def _optimizer_description() -> str:
  """The server optimizer of the flags, e.g. 'adam(0.97, 0.999)'."""
  # pylint: disable=protected-access
  name = baffle_main.server_optimizer_name()
  if name == 'adam':
    return (f'adam({baffle_main._ADAM_BETA1.value:g}, '
            f'{baffle_main._ADAM_BETA2.value:g})')
  return f'{name}({baffle_main._MOMENTUM.value:g})'


def _budget_row(name: str, output_dir: str) -> collections.OrderedDict:
  """budget.json's row of one run of BUDGET_RUNS: the paper table's fields,
  then the budget (passes per client: forward; and backward for backprop),
  the server optimizer and schedule and the clients' train accuracy."""
  # pylint: disable=protected-access
  method, values = _run_flags('budget', name, output_dir)
  with flagsaver.flagsaver(**values):
    baffle_main.apply_recipe()
    common = dict(
        optimizer=_optimizer_description(),
        lr=baffle_main._LR.value,
        schedule=(baffle_main._LR_SCHEDULE.value
                  + (f', warm-up {baffle_main._WARMUP_ROUNDS.value}'
                     if baffle_main._WARMUP_ROUNDS.value else '')),
        epochs=None)
    if method == 'baffle':
      summary = baffle_main.run()
      return _paper_row(
          name, method='baffle', rounds=summary['rounds'],
          final_test_accuracy=summary['final_test_accuracy'],
          accuracy_by_round=summary['accuracy_by_round'],
          wall_seconds=summary['wall_time_seconds'],
          K=baffle_main._K.value, directions=baffle_main._DIRECTIONS.value,
          estimator=baffle_main._ESTIMATOR.value,
          mode=baffle_main._MODE.value, ema=False,
          forward_passes_per_client=summary['forward_passes_per_client'],
          backward_passes_per_client=0,
          train_accuracy=summary['final_train_accuracy'],
          upload_bytes=summary['upload_bytes_per_client_per_round'],
          **common)
    task = experiment.load_task(
        pad_digits_to_32x32=True,
        resize_digits=baffle_main._RESIZE_DIGITS.value)
    # A FedSGD step is one batch; a FedAvg round a local epoch of them.
    steps = 1 if method == 'fedsgd' else baffle_main.rounds_per_epoch_of(task)
    rounds = experiment.ROUNDS.value
    summary = run_baseline(method, values['output_dir'])
    if method == 'fedavg':
      common['optimizer'] = (f'client {baffle_main._CLIENT_OPTIMIZER.value} '
                             f'{baffle_main._CLIENT_LR.value:g}, server sgd '
                             '1.0')
      common.update(lr=1.0, schedule='constant')
    return _paper_row(
        name, method=method, rounds=rounds,
        final_test_accuracy=summary['final_test_accuracy'],
        accuracy_by_round=summary['accuracy_by_round'],
        wall_seconds=summary['wall_time_seconds'],
        forward_passes_per_client=steps * rounds,
        backward_passes_per_client=steps * rounds,
        train_accuracy=summary['final_train_accuracy'],
        upload_bytes=summary['upload_bytes'], **common)


def make_budget_table(rows: Sequence[dict]) -> str:
  """The markdown table of budget.json's rows."""
  header = ['run', 'method', 'directions', 'K', 'estimator',
            'server optimizer', 'lr, schedule', 'passes / client (fwd + bwd)',
            'rounds', 'final test accuracy', 'best (round)',
            'train accuracy', 'wall time (s)']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  dash = lambda v: '-' if v is None else str(v)
  for row in rows:
    by_round = {int(r): a for r, a in row['accuracy_by_round'].items()}
    best = max(by_round, key=lambda r: (by_round[r], -r))
    passes = f"{row['forward_passes_per_client']:,.0f}"
    if row['backward_passes_per_client']:
      passes += f" + {row['backward_passes_per_client']:,.0f}"
    train = row['train_accuracy']
    cells = [row['run'], row['method'], dash(row['directions']),
             dash(row['K']), dash(row['estimator']), row['optimizer'],
             f"{row['lr']:g}, {row['schedule']}", passes,
             f"{row['rounds']:,}", f"{row['final_test_accuracy']:.4f}",
             f'{by_round[best]:.4f} ({best:,})',
             '-' if train is None else f'{train:.4f}',
             f"{row['wall_seconds']:.0f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_budget(rows: Sequence[dict], path: str) -> None:
  """Test accuracy against passes per client (log x): BAFFLE's forward
  passes, backprop's forward + backward passes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # No display; write a file.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(9, 5.5))
  colours = plt.get_cmap('tab10').colors
  for i, row in enumerate(rows):
    per_round = (row['forward_passes_per_client']
                 + row['backward_passes_per_client']) / row['rounds']
    # Round 0 (no passes) has no place on a log axis; chance is drawn.
    points = sorted((int(r) * per_round, a)
                    for r, a in row['accuracy_by_round'].items() if int(r))
    budget = (f", {row['forward_passes_per_client'] / 1000:,.0f}k passes"
              if row['method'] == 'baffle' else
              f", {row['rounds']:,} rounds")
    if row['method'] == 'baffle':
      label = (f"BAFFLE {row['directions']} K={row['K']} {row['estimator']}, "
               f"{row['optimizer']} {row['schedule']}{budget}")
    else:
      label = f"{row['method']} (backprop, fwd + bwd passes){budget}"
    ax.plot(*zip(*points), marker='.', label=label,
            color=colours[i % len(colours)],
            linestyle='-' if row['method'] == 'baffle' else '--')
  ax.set_xscale('log')
  ax.axhline(0.1, color='gray', linestyle=':', label='chance (round 0)')
  ax.set_xlabel('passes through the network per client')
  ax.set_ylabel('test accuracy')
  ax.set_ylim(0, 1)
  ax.set_title('LeNet, embedded digits, 10 IID clients of 400, batch 32')
  ax.legend(fontsize=7, loc='lower right')  # Backprop runs along the top.
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


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
    ax.axhline(0.1, color='gray', linestyle=':', label='chance (round 0)')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy')
    ax.set_ylim(0, 1)
    ax.set_title(f'{model} ({activation}), embedded digits, 10 IID clients')
    ax.legend(fontsize=7, loc='upper left')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def grid_main(output_dir: str, grid: str) -> None:
  """Runs --experiment=paper|budget (`grid`): the runs of --paper_runs (or
  all) not yet in `<output_dir>/<grid>.json`, each added to it as it ends;
  then writes `<grid>.md` (the table) and `<grid>.png`."""
  runs = _grid_runs(grid)
  run_rows, make_grid_table, plot = {
      'paper': (_paper_rows, make_paper_table, plot_paper),
      'budget': (lambda name, out: [_budget_row(name, out)],
                 make_budget_table, plot_budget),
  }[grid]
  names = _PAPER_RUNS.value or list(runs)
  for name in names:
    if name not in runs:
      raise experiment.FlagError(f'--paper_runs: {name!r} is not one of '
                                 f'{list(runs)}.')
  experiment.validate_runs(
      baffle_main.validate_flags,
      [_run_flags(grid, name, output_dir)[1] for name in names])
  os.makedirs(output_dir, exist_ok=True)
  rows = _run_grid(os.path.join(output_dir, f'{grid}.json'), names,
                   lambda name: run_rows(name, output_dir))
  table = make_grid_table(rows)
  with open(os.path.join(output_dir, f'{grid}.md'), 'w') as f:
    f.write(table + '\n')
  plot(rows, os.path.join(output_dir, f'{grid}.png'))
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
  """--experiment=estimators, paper or budget, into --output_dir."""
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
  if which in ('paper', 'budget'):
    grid_main(output_dir, which)
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
        final_train_accuracy=summary['final_train_accuracy'],
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
