r"""Trains FedAvg whose server learning rate is learned by Federated AD.

  python -m research.hypergradient_fedavg.main --output_dir out/hypergrad

Writes metrics.csv (per round), tensorboard/, accuracy_and_lr.png and
summary.json (final test accuracy, final server learning rate, communication
cost of one round) to --output_dir. `--algorithm=fedavg` runs TFF's own
`build_weighted_fed_avg` with a fixed server learning rate, for comparison.
"""

import collections
import os
import time
from typing import Any, Optional

from absl import app
from absl import flags
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from research import experiment
from research import run_dir
from tff_fad import aggregation
from tff_fad.learning import functional_models
from tff_fad.learning import hypergradient_fed_avg
from tff_fad.learning import models

# Algorithm.
_ALGORITHM = flags.DEFINE_enum(
    'algorithm', 'hypergradient', ['hypergradient', 'fedavg'],
    "'hypergradient': tff_fad's FedAvg with a learned server learning rate; "
    "'fedavg': TFF's build_weighted_fed_avg with a fixed one.")
_MODE = flags.DEFINE_enum('fad_mode', 'forward', list(hypergradient_fed_avg.MODES),
                          'Federated AD mode of the hypergradient.')
_SERVER_LR = flags.DEFINE_float(
    'server_lr', 0.1, 'Initial (hypergradient) or fixed (fedavg) server '
    'learning rate.')
_SERVER_OPTIMIZER = flags.DEFINE_enum(
    'server_optimizer', 'sgd', ['sgd', 'sgdm', 'adam', 'adagrad', 'yogi'],
    'FedOpt server optimizer (TFF\'s build_sgdm without/with momentum '
    '0.9, build_adam, build_adagrad, build_yogi at their default settings); '
    'hypergradient learns its learning rate, from --server_lr.')
_HYPER_LR = flags.DEFINE_float(
    'hyper_lr', 0.1, 'Adam learning rate of log(server learning rate).')
_HYPER_BETA_1 = flags.DEFINE_float(
    'hyper_beta_1', 0.0,
    'Adam beta_1 (momentum) of the hyper-optimizer. 0: the carried tangent '
    '(--tangent_decay) already averages over rounds; momentum on top makes '
    'the rate overshoot.')
_HYPER_BETA_2 = flags.DEFINE_float(
    'hyper_beta_2', 0.999,
    "Adam beta_2 of the hyper-optimizer (TFF's default 0.999). Adam divides "
    'by the RMS of the hypergradient over about 1/(1 - beta_2) rounds, so '
    'one huge hypergradient (a round that blew the loss up) stalls the rate '
    'for that long; a smaller beta_2 forgets it sooner.')
_TANGENT_DECAY = flags.DEFINE_float(
    'tangent_decay', 0.9,
    'How much of d(model)/d(log lr) carries over to the next round, in '
    '[0, 1): 0 is the greedy one-step hypergradient; g looks back about '
    '1/(1-g) rounds.')
_POST_UPDATE_LOSS = flags.DEFINE_enum(
    'post_update_loss', 'first_batch',
    list(hypergradient_fed_avg.POST_UPDATE_LOSSES),
    "Loss the hypergradient differentiates: 'first_batch', each client's "
    'first local batch, whose gradient the first local step computes anyway '
    "(FedAvg's cost); 'all_batches', all its data (a second pass).")
# Differential privacy of the learned rate (with --aggregator=dp).
_DP_LOSS_CLIP = flags.DEFINE_float(
    'dp_loss_clip', 5.0,
    "With --aggregator=dp: clip of each client's post-update loss, "
    'aggregated by DP-Gaussian with --dp_noise_multiplier.')
_DP_HYPERGRADIENT_CLIP = flags.DEFINE_float(
    'dp_hypergradient_clip', 1.0,
    "With --aggregator=dp: clip of each client's d loss / d log lr, "
    'aggregated by its own DP-Gaussian release.')
_WEIGHTING = flags.DEFINE_enum(
    'weighting', 'example_count', ['example_count', 'uniform', 'learned'],
    "Client weights of the update average: 'example_count' (FedAvg), "
    "'uniform', or 'learned' (n_i ** exponent, exponent learned by FAD).")
_WEIGHT_EXPONENT = flags.DEFINE_float(
    'initial_weight_exponent', 0.0,
    "Starting exponent of --weighting=learned (0: uniform, 1: by examples).")

experiment.set_flag_defaults(
    rounds=40, clients_per_round=10, num_clients=50, dirichlet_alpha='0.5',
    batch_size=20, client_lr=0.05, dp_clip=1.0, eval_every=5)
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
_CLIENT_EPOCHS = experiment.CLIENT_EPOCHS
_EVAL_EVERY = experiment.EVAL_EVERY
_SEED = experiment.SEED
_OUTPUT_DIR = experiment.OUTPUT_DIR

_LR_KEY = 'hyperparameters/server_learning_rate'


def validate_flags() -> None:
  """Raises experiment.FlagError naming the first bad flag."""
  experiment.validate_execution_flags()  # First: it names a nan as such.
  experiment.require_positive(
      _SERVER_LR, _CLIENT_LR, _CLIENT_EPOCHS, _BATCH_SIZE, _ROUNDS,
      _CLIENTS_PER_ROUND, _NUM_CLIENTS, _EVAL_EVERY, _DP_CLIP, _DP_LOSS_CLIP,
      _DP_HYPERGRADIENT_CLIP)
  experiment.require_positive(_HYPER_LR, _DP_NOISE, allow_zero=True)
  experiment.require_unit_interval(_TANGENT_DECAY, _HYPER_BETA_1, _HYPER_BETA_2)
  experiment.require_dp_delta()
  if _ALGORITHM.value == 'fedavg' and _AGGREGATOR.value == 'dp':
    raise experiment.FlagError('--aggregator=dp is supported with '
                               '--algorithm=hypergradient only.')
  if _AGGREGATOR.value == 'dp' and _MODE.value != 'forward':
    raise experiment.FlagError(
        '--aggregator=dp needs --fad_mode=forward: in reverse mode each '
        "client would upload its model-sized loss gradient, which no DP "
        'aggregator here covers.')
  if _WEIGHTING.value == 'learned' and (
      _ALGORITHM.value != 'hypergradient' or _AGGREGATOR.value != 'mean' or
      _MODE.value != 'forward'):
    raise experiment.FlagError(
        '--weighting=learned needs --algorithm=hypergradient, '
        '--aggregator=mean and --fad_mode=forward (its average must be '
        'differentiable in the weights).')
  if _WEIGHTING.value == 'learned' and _SERVER_OPTIMIZER.value != 'sgd':
    raise experiment.FlagError(
        '--weighting=learned needs --server_optimizer=sgd: its learned rate '
        'is that of plain server SGD (w - lr * delta); got '
        f'--server_optimizer={_SERVER_OPTIMIZER.value}.')
  experiment.required_output_dir()
  experiment.validate_task_flags()


def _dp_gaussian(clip: float):
  return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
      noise_multiplier=_DP_NOISE.value,
      clients_per_round=float(_CLIENTS_PER_ROUND.value), clip=clip)


def _aggregator():
  if _AGGREGATOR.value == 'dp':
    return _dp_gaussian(_DP_CLIP.value)
  return tff.aggregators.MeanFactory()


def _private_aggregators() -> dict[str, Any]:
  """Under --aggregator=dp, every other release of client data: the loss
  and its derivative through their own DP-Gaussian factories, and no
  training metrics."""
  if _AGGREGATOR.value != 'dp':
    return {}
  return dict(loss_aggregator=_dp_gaussian(_DP_LOSS_CLIP.value),
              hypergradient_aggregator=_dp_gaussian(
                  _DP_HYPERGRADIENT_CLIP.value),
              metrics_aggregator=functional_models.release_no_metrics)


def privacy(model) -> Optional[aggregation.PrivacyReport]:
  """The run's (epsilon, delta) under --aggregator=dp, else None."""
  if _AGGREGATOR.value != 'dp':
    return None
  private = _private_aggregators()
  return hypergradient_fed_avg.round_privacy_report(
      model, tff.learning.optimizers.build_sgdm(_CLIENT_LR.value),
      model_aggregator=_aggregator(),
      loss_aggregator=private['loss_aggregator'],
      hypergradient_aggregator=private['hypergradient_aggregator'],
      post_update_loss=_POST_UPDATE_LOSS.value,
      client_weighting=_client_weighting(), metrics_released=False,
      sampling_rate=_CLIENTS_PER_ROUND.value / _NUM_CLIENTS.value,
      rounds=_ROUNDS.value, delta=experiment.DP_DELTA.value)


def _client_weighting():
  if _WEIGHTING.value == 'uniform':
    return tff.learning.ClientWeighting.UNIFORM
  return tff.learning.ClientWeighting.NUM_EXAMPLES


def server_optimizer_fn(name: str, learning_rate: float
                        ) -> tff.learning.optimizers.Optimizer:
  """TFF's FedOpt server optimizer `name` at `learning_rate`."""
  optimizers = tff.learning.optimizers
  return {
      'sgd': lambda: optimizers.build_sgdm(learning_rate),
      'sgdm': lambda: optimizers.build_sgdm(learning_rate, momentum=0.9),
      'adam': lambda: optimizers.build_adam(learning_rate),
      'adagrad': lambda: optimizers.build_adagrad(learning_rate),
      'yogi': lambda: optimizers.build_yogi(learning_rate),
  }[name]()


def build_process(model):
  client_optimizer = tff.learning.optimizers.build_sgdm(_CLIENT_LR.value)
  server_optimizer = server_optimizer_fn(_SERVER_OPTIMIZER.value,
                                         _SERVER_LR.value)
  if _ALGORITHM.value == 'fedavg':
    return tff.learning.algorithms.build_weighted_fed_avg(
        model, client_optimizer, server_optimizer,
        client_weighting=_client_weighting(), model_aggregator=_aggregator())
  hyper_optimizer = tff.learning.optimizers.build_adam(
      _HYPER_LR.value, beta_1=_HYPER_BETA_1.value, beta_2=_HYPER_BETA_2.value)
  if _WEIGHTING.value == 'learned':
    return hypergradient_fed_avg.build_learned_weighting_fed_avg(
        model, client_optimizer, server_optimizer,
        hyper_optimizer_fn=hyper_optimizer,
        initial_weight_exponent=_WEIGHT_EXPONENT.value,
        tangent_decay=_TANGENT_DECAY.value,
        post_update_loss=_POST_UPDATE_LOSS.value)
  return hypergradient_fed_avg.build_hypergradient_fed_avg(
      model, client_optimizer, server_optimizer,
      hyper_optimizer_fn=hyper_optimizer, client_weighting=_client_weighting(),
      model_aggregator=_aggregator(), mode=_MODE.value,
      tangent_decay=_TANGENT_DECAY.value,
      post_update_loss=_POST_UPDATE_LOSS.value, **_private_aggregators())


def run() -> dict[str, Any]:
  """Trains and writes the outputs; returns the summary."""
  validate_flags()
  with run_dir.lock(_OUTPUT_DIR.value):
    return _run()


def _run() -> dict[str, Any]:
  start = time.time()
  output_dir = _OUTPUT_DIR.value
  tf.random.set_seed(_SEED.value)

  task = experiment.load_task(pad_digits_to_32x32=_MODEL.value != 'linear')
  process = build_process(task.model)
  cost = tff_fad.communication_cost(process.next, _CLIENTS_PER_ROUND.value)
  select = experiment.client_selector(
      task, clients_per_round=_CLIENTS_PER_ROUND.value, seed=_SEED.value)
  evaluate_weights = experiment.evaluator(task, experiment.EVAL_CLIENTS.value)

  def evaluate(state, unused_data):
    return evaluate_weights(process.get_model_weights(state))

  progress = experiment.ProgressReleaseManager(_ROUNDS.value, [
      ('lr', _LR_KEY, '.4f'),
      ('exponent', 'hyperparameters/weight_exponent', '.3f'),
      ('hypergrad', 'hyperparameters/hypergradient', '+.4f'),
      ('train_loss', 'client_work/train/loss', '.4f'),
      ('test_acc', experiment.CENTRAL_ACCURACY_KEY, '.4f'),
      ('fed_test_acc', 'evaluation/federated/accuracy', '.4f'),
  ])
  name = ('FedAvg (fixed server lr)' if _ALGORITHM.value == 'fedavg'
          else f'Hypergradient FedAvg ({_MODE.value} mode, tangent decay '
          f'{_TANGENT_DECAY.value:g})')
  print(f'{name}: {task.description}, {_ROUNDS.value} rounds x '
        f'{_CLIENTS_PER_ROUND.value} clients, initial server lr '
        f'{_SERVER_LR.value}', flush=True)
  if task.note:
    print(f'Note: {task.note}', flush=True)
  print(f'Communication per round: {cost}', flush=True)
  report = privacy(task.model)
  if report is not None:
    experiment.print_privacy(report)
  state, resumed_from, final = experiment.train(
      process, select, output_dir=output_dir, rounds=_ROUNDS.value,
      evaluate=evaluate, eval_every=_EVAL_EVERY.value, progress=progress,
      flag_values=experiment.flag_values(__name__))
  history = experiment.read_metrics(output_dir)  # Includes resumed rounds.
  accuracy_key, test_summary = experiment.final_evaluation(
      final, history, _ROUNDS.value)

  final_hparams = process.get_hparams(state)['finalizer']
  final_lr = float(final_hparams['learning_rate'])
  acc_rounds = sorted(r for r in history if accuracy_key in history[r])
  lr_rounds = sorted(r for r in history if _LR_KEY in history[r])
  panels = [dict(rounds=acc_rounds,
                 values=[history[r][accuracy_key] for r in acc_rounds],
                 ylabel='test accuracy', ylim=(0, 1),
                 hlines=[(0.1, 'chance')])]
  if lr_rounds:
    panels.append(dict(rounds=lr_rounds,
                       values=[history[r][_LR_KEY] for r in lr_rounds],
                       ylabel='server learning rate', log=True))
  plot_path = os.path.join(output_dir, 'accuracy_and_lr.png')
  experiment.plot_series(plot_path, name, panels)

  summary = collections.OrderedDict(
      algorithm=_ALGORITHM.value,
      task=task.description,
      **test_summary,
      server_optimizer=_SERVER_OPTIMIZER.value,
      post_update_loss=(_POST_UPDATE_LOSS.value
                        if _ALGORITHM.value == 'hypergradient' else None),
      initial_server_learning_rate=_SERVER_LR.value,
      final_server_learning_rate=final_lr,
      weighting=_WEIGHTING.value,
      final_weight_exponent=(float(final_hparams['weight_exponent'])
                             if _WEIGHTING.value == 'learned' else None),
      rounds=_ROUNDS.value,
      num_params=task.num_params,
      communication_per_round=collections.OrderedDict(
          clients=cost.num_clients,
          server_to_client_bytes_per_client=(
              cost.server_to_client_bytes_per_client),
          client_to_server_bytes_per_client=(
              cost.client_to_server_bytes_per_client),
          round_trips=cost.round_trips),
      privacy=experiment.privacy_summary(report),
      server_learning_rate_by_round={str(r): history[r][_LR_KEY]
                                     for r in lr_rounds},
      resumed_from_round=resumed_from,
      **experiment.wall_time(start, history, resumed_from),
      flags=experiment.flag_values(__name__))
  summary = run_dir.write_summary(output_dir, summary, history)
  trained = experiment.training_time(summary, resumed_from, _ROUNDS.value)
  print(f"Final test accuracy ({test_summary['test_accuracy_from']}): "
        f"{test_summary['final_test_accuracy']:.4f}; server learning rate "
        f'{_SERVER_LR.value:g} -> {final_lr:.4f} after {_ROUNDS.value} rounds '
        f'({trained})')
  print(f'Outputs written to {os.path.abspath(output_dir)}: metrics.csv, '
        'tensorboard/, accuracy_and_lr.png, summary.json')
  return summary


def main(argv: list[str]) -> None:
  experiment.run_main(run, argv)


if __name__ == '__main__':
  app.run(main)
