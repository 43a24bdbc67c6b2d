r"""The README's hypergradient FedAvg experiments, same seeds and rounds.

--experiment=rates: TFF's `build_weighted_fed_avg` with fixed server
learning rates (--fixed_rates) against tff_fad's hypergradient FedAvg started
from --hypergradient_starts, once per --tangent_decays value (0: the greedy
one-step hypergradient).
--experiment=weighting: hypergradient FedAvg averaging client updates
uniformly, by example count, or with learned weights (n_i ** exponent);
run it under strong label skew (e.g. --dirichlet_alpha=0.1).

Writes a markdown table (final test accuracy, first round reaching
--target_accuracy, final server learning rate / weight exponent) to
--output_dir/table.md, plus table.json, each run's outputs (a run finished
there with the same flags is kept, not rerun) and (rates) the
learned rates by round, learned_rates.png (`plot_learned_rates`), which also
draws the runs of earlier experiments named by --plot_with (e.g. the other
server optimizer's grid), a panel per task and server optimizer.

  python -m research.hypergradient_fedavg.experiments --experiment=rates \
      --output_dir out/rates
  python -m research.hypergradient_fedavg.experiments --experiment=weighting \
      --dirichlet_alpha=0.1 --output_dir out/weighting
"""

import collections
import json
import os

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np

from research import experiment
from research import run_dir
from research.hypergradient_fedavg import main as hypergradient_main
from tff_fad.learning import hypergradient_fed_avg

EXPERIMENTS = ('rates', 'weighting')  # --experiment; the first is the default.
_FIXED = flags.DEFINE_list('fixed_rates', ['0.1', '0.3', '1.0', '3.0', '10.0'],
                           'Server learning rates of the FedAvg baselines.')
_STARTS = flags.DEFINE_list('hypergradient_starts', ['0.1', '3.0', '10.0'],
                            'Initial rates of the hypergradient runs.')
_DECAYS = flags.DEFINE_list(
    'tangent_decays', ['0.0', '0.9'],
    'tangent_decay values of the hypergradient runs (--experiment=rates).')
_POST_UPDATE_LOSSES = flags.DEFINE_list(
    'post_update_losses', ['first_batch'],
    '--post_update_loss values of the hypergradient runs '
    '(--experiment=rates).')
_TARGET = flags.DEFINE_float('target_accuracy', 0.8,
                             'Accuracy whose first round is reported.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (runs are averaged).')
_PLOT_WITH = flags.DEFINE_list(
    'plot_with', [], '--experiment=rates: --output_dir of earlier rates '
    'experiments whose runs learned_rates.png draws next to this one\'s.')


def _first_round_reaching(accuracy_by_round, target):
  # Accuracies are float32: 9 of 10 right is 0.89999998 < 0.9.
  target = np.float32(target)
  for r, acc in sorted(accuracy_by_round.items(), key=lambda kv: int(kv[0])):
    if np.float32(acc) >= target:
      return int(r)
  return None


def _mean(summaries, key):
  """Mean of `key` over the seeds' summaries; None where it does not apply."""
  values = [s[key] for s in summaries]
  return None if None in values else sum(values) / len(values)


def _hyper_optimizer(run_flags: dict) -> str:
  beta_2 = run_flags.get('hyper_beta_2', 0.999)  # Runs from before the flag.
  return (f"Adam {run_flags['hyper_lr']:g}, beta_1 "
          f"{run_flags['hyper_beta_1']:g}" +
          ('' if beta_2 == 0.999 else f', beta_2 {beta_2:g}'))


def finished_runs(output_dir: str) -> list[str]:
  """The run directories (with a summary) of an experiment's --output_dir."""
  if not os.path.isdir(output_dir):
    raise ValueError(f'{output_dir!r} is not a directory of runs.')
  runs = sorted(
      os.path.join(output_dir, name) for name in os.listdir(output_dir)
      if os.path.isfile(os.path.join(output_dir, name, run_dir.SUMMARY_FILE)))
  if not runs:
    raise ValueError(
        f'{output_dir!r} holds no finished run (no */summary.json).')
  return runs


def plot_learned_rates(run_dirs, path: str) -> list[tuple[str, str]]:
  """One panel per task (the summaries' model-and-data description) and
  server optimizer: the learned rate of every hypergradient run by round (one
  line per seed, a colour per starting rate), the fixed rates of the FedAvg
  runs as dotted lines (the best by final accuracy in black). Returns the
  panels' (task, optimizer)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # No display; write a file.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  runs = collections.defaultdict(list)
  for directory in run_dirs:
    with open(os.path.join(directory, run_dir.SUMMARY_FILE)) as f:
      summary = json.load(f)
    runs[summary['task'], summary['server_optimizer']].append(summary)
  columns = min(len(runs), 2)
  rows = -(-len(runs) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows),
                           squeeze=False)
  for ax in axes.flat[len(runs):]:
    ax.set_visible(False)
  for ax, ((task, optimizer), summaries) in zip(axes.flat,
                                               sorted(runs.items())):
    fixed = collections.defaultdict(list)
    for s in summaries:
      if s['algorithm'] == 'fedavg':
        fixed[s['initial_server_learning_rate']].append(
            s['final_test_accuracy'])
    best = max(fixed, key=lambda r: sum(fixed[r]) / len(fixed[r]),
               default=None)
    for rate in sorted(fixed):
      ax.axhline(rate, linestyle=':', color='black' if rate == best
                 else 'gray', linewidth=1.5 if rate == best else 0.8,
                 label=f'fixed {rate:g} (best)' if rate == best else None)
    starts = sorted({s['initial_server_learning_rate'] for s in summaries
                     if s['algorithm'] == 'hypergradient'})
    colours = plt.get_cmap('viridis')(np.linspace(0, 0.85, max(len(starts),
                                                                1)))
    for s in summaries:
      if s['algorithm'] != 'hypergradient':
        continue
      colour = colours[starts.index(s['initial_server_learning_rate'])]
      by_round = sorted((int(r), v) for r, v in
                        s['server_learning_rate_by_round'].items())
      ax.plot([r for r, _ in by_round], [v for _, v in by_round],
              color=colour, linewidth=1,
              label=f"from {s['initial_server_learning_rate']:g}, seed "
              f"{s['flags']['seed']}")
    ax.set_yscale('log')
    ax.set_xlabel('round')
    ax.set_ylabel('server learning rate')
    ax.set_title(f'{task}\nserver {optimizer}: learned rates (fixed grid '
                 'dotted)', fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return sorted(runs)


def main(argv):
  experiment.run_main(run_experiment, argv, grid=True)


def run_experiment() -> None:
  """--experiment=rates or weighting, into --output_dir."""
  output_dir = experiment.required_output_dir()
  which = experiment.experiment_name(EXPERIMENTS)
  if _PLOT_WITH.value and which != 'rates':
    raise experiment.FlagError(
        '--plot_with is for --experiment=rates, which plots the learned '
        f'rates; got --experiment={which}.')
  # Checked before any training, so a typo loses no run.
  try:
    earlier = [run for d in _PLOT_WITH.value for run in finished_runs(d)]
  except ValueError as e:
    raise experiment.FlagError(f'--plot_with: {e}') from None
  seeds = experiment.parse_numbers(_SEEDS, int)
  if which == 'rates':
    for loss in _POST_UPDATE_LOSSES.value:
      if loss not in hypergradient_fed_avg.POST_UPDATE_LOSSES:
        raise experiment.FlagError(
            f'--post_update_losses: {loss!r} is not one of '
            f'{", ".join(hypergradient_fed_avg.POST_UPDATE_LOSSES)}.')
    starts = experiment.parse_numbers(_STARTS)
    configs = [dict(algorithm='fedavg', server_lr=r)
               for r in experiment.parse_numbers(_FIXED)] + [
                   dict(algorithm='hypergradient', server_lr=r,
                        tangent_decay=d, post_update_loss=loss)
                   for d in experiment.parse_numbers(_DECAYS)
                   for loss in _POST_UPDATE_LOSSES.value for r in starts]
  else:
    configs = [dict(algorithm='hypergradient', weighting=w)
               for w in ('uniform', 'example_count', 'learned')]
  experiment.validate_runs(
      hypergradient_main.validate_flags,
      [dict(output_dir=output_dir, **config) for config in configs])
  rows, run_dirs = [], []
  for config in configs:
    runs = []
    for seed in seeds:
      name = '_'.join(f'{k}{v}' for k, v in config.items())
      path = os.path.join(output_dir, f'{name}_seed{seed}')
      run_dirs.append(path)
      with flagsaver.flagsaver(seed=seed, output_dir=path,
                               eval_every=1, **config):
        finished = None if experiment.OVERWRITE.value else (
            run_dir.finished_summary(
                path, experiment.flag_values(hypergradient_main.__name__)))
        runs.append(finished or hypergradient_main.run())
    reached = [_first_round_reaching(s['accuracy_by_round'], _TARGET.value)
               for s in runs]
    hypergradient = runs[0]['algorithm'] == 'hypergradient'
    rows.append(collections.OrderedDict(
        task=runs[0]['task'],
        algorithm=runs[0]['algorithm'], weighting=runs[0]['weighting'],
        server_optimizer=runs[0]['server_optimizer'],
        initial_server_lr=runs[0]['initial_server_learning_rate'],
        post_update_loss=(runs[0]['flags']['post_update_loss']
                          if hypergradient else None),
        tangent_decay=(runs[0]['flags']['tangent_decay']
                       if hypergradient else None),
        hyper_optimizer=(_hyper_optimizer(runs[0]['flags'])
                         if hypergradient else None),
        final_weight_exponent=_mean(runs, 'final_weight_exponent'),
        final_test_accuracy=_mean(runs, 'final_test_accuracy'),
        rounds_to_target=reached,
        final_server_lr=_mean(runs, 'final_server_learning_rate'),
        final_test_accuracy_per_seed=[s['final_test_accuracy'] for s in runs],
        wall_seconds=_mean(runs, 'wall_time_seconds'),
        seeds=seeds,
        rounds=runs[0]['rounds']))
  lines = [
      f'| algorithm | server optimizer | client weighting | server lr '
      '(initial) | hyper-optimizer | tangent decay | post-update loss | final '
      f'test accuracy | first round >= {_TARGET.value:.0%} | final server lr '
      '| final weight exponent | s / run |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    name = ('FedAvg, fixed lr' if r['algorithm'] == 'fedavg'
            else 'hypergradient FedAvg')
    reached = ', '.join('-' if x is None else str(x)
                        for x in r['rounds_to_target'])
    exponent = ('' if r['final_weight_exponent'] is None
                else f"{r['final_weight_exponent']:.3f}")
    decay = ('-' if r['tangent_decay'] is None
             else f"{r['tangent_decay']:g}")
    wall = '' if r['wall_seconds'] is None else f"{r['wall_seconds']:.0f}"
    lines.append(f"| {name} | {r['server_optimizer']} | {r['weighting']} | "
                 f"{r['initial_server_lr']:g} | "
                 f"{r['hyper_optimizer'] or '-'} | {decay} | "
                 f"{r['post_update_loss'] or '-'} | "
                 f"{r['final_test_accuracy']:.4f} | {reached} | "
                 f"{r['final_server_lr']:.3f} | {exponent} | {wall} |")
  table = '\n'.join(lines)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'table.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(output_dir, 'table.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  if which == 'rates':
    plotted = {os.path.realpath(d): d for d in earlier + run_dirs}
    plot_learned_rates(list(plotted.values()),
                       os.path.join(output_dir, 'learned_rates.png'))
  print(table)


if __name__ == '__main__':
  app.run(main)
