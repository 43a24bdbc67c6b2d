r"""Trains a model with BAFFLE (forward-only federated learning).

Runs on the embedded offline digits by default:

  python -m research.baffle.main --output_dir /tmp/baffle

writes `metrics.csv` (one row per round), `tensorboard/`, `accuracy.png` and
`summary.json` (final test accuracy, upload bytes per client per round, flags)
to `--output_dir`, and prints progress and the final accuracy.

  python -m research.baffle.main --recipe=paper --output_dir /tmp/baffle_paper

runs the official code's MNIST recipe (github FengHZ/BAFFLE, its README's
LeNet command) on the embedded digits: `PAPER_RECIPE` sets the flags; any
flag given explicitly overrides it.
"""

import collections
import os
import time
from typing import Any, Optional

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from research import experiment
from research import run_dir
from tff_fad.learning import baffle
from tff_fad.learning import functional_models as fm
from tff_fad.learning import models
from tff_fad.learning import optimizers as fad_optimizers

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
_LR = flags.DEFINE_float('lr', 1e-2, 'Server learning rate (of '
                         '--optimizer; the peak of --lr_schedule).')
_OPTIMIZER = flags.DEFINE_enum(
    'optimizer', None, ['adam', 'sgd', 'nesterov'],
    "Server optimizer (the official code's --optimizer): Adam (with "
    "--adam_*), SGD with heavy-ball momentum --momentum (TFF's build_sgdm) "
    'or with Nesterov momentum '
    '(tff_fad.learning.optimizers.build_nesterov_sgdm); default adam for '
    'fedsgd, sgd for one_epoch (FedAvg\'s server).')
_MOMENTUM = flags.DEFINE_float(
    'momentum', 0.0, 'Momentum of --optimizer=sgd|nesterov.')
_LR_SCHEDULE = flags.DEFINE_enum(
    'lr_schedule', 'constant', list(fad_optimizers.SCHEDULES),
    'Decay of the server learning rate over the run, after --warmup_rounds '
    '(tff.learning.optimizers.schedule_learning_rate).')
_WARMUP_ROUNDS = flags.DEFINE_integer(
    'warmup_rounds', 0, 'Rounds of linear warm-up of the server learning '
    'rate.')
_PARALLEL = flags.DEFINE_integer(
    'parallel_perturbations', 1, 'P: perturbed models evaluated per batched '
    'forward pass (1: one at a time, least memory).')
_DIRECTIONS = flags.DEFINE_enum(
    'directions', 'shared', list(baffle.DIRECTIONS),
    "fedsgd: 'shared' (one seed per round: K directions per round, K scores "
    "per client, secure-sum and DP compatible) or 'per_client' (each client "
    'its own seed, uploaded with its K scores: C x K directions per round; '
    'the server sees each client\'s scores, so not with --aggregator=dp).')
_CLIENT_CLIP = flags.DEFINE_float(
    'client_clip', 0.0, "Each client scales its own estimate to this "
    "inf-norm before averaging (the official code's clip_grad_norm_(0.3, "
    "'inf')); 0 disables it.")
_WEIGHT_DECAY = flags.DEFINE_float(
    'weight_decay', 0.0, "L2 term added to the gradient estimate, as torch's "
    'Adam(weight_decay=...).')
_ADAM_BETA1 = flags.DEFINE_float('adam_beta1', 0.9, 'Adam beta_1.')
_ADAM_BETA2 = flags.DEFINE_float('adam_beta2', 0.999, 'Adam beta_2.')
_ADAM_EPSILON = flags.DEFINE_float('adam_epsilon', 1e-7, 'Adam epsilon.')
_CLIENT_OPTIMIZER = flags.DEFINE_enum(
    'client_optimizer', 'sgd', ['sgd', 'adam'],
    "one_epoch's local optimizer (rate --client_lr; Adam with --adam_*), "
    'fresh each round.')
_EMA_EVERY = flags.DEFINE_integer(
    'ema_every', 1, 'Rounds between EMA updates; 0: once per epoch (fedsgd: '
    "ceil(a client's examples / --batch_size) rounds; one_epoch: 1).")
_EMA_WARMUP = flags.DEFINE_bool(
    'ema_warmup', False, "torch_ema's warm-up: the n-th EMA update uses "
    'decay min(--ema, (1 + n) / (10 + n)).')
_EPOCHS = flags.DEFINE_integer(
    'epochs', 0, 'If > 0, train this many epochs (sets --rounds: epochs x '
    'the rounds of an epoch, see --ema_every).')
_FORWARD_PASSES = flags.DEFINE_integer(
    'forward_passes', 0, 'If > 0, the forward-pass budget of each client: '
    'sets --rounds to as many rounds as it pays for (the passes of a round: '
    'tff_fad.learning.baffle.forward_passes_per_step, times the local steps '
    'in one_epoch).')
_RESIZE_DIGITS = flags.DEFINE_bool(
    'resize_digits', False, 'LeNet/WRN on the embedded digits: resize them '
    'to 32x32 (bilinear, as the official code) instead of zero-padding.')
_LOG_GRADIENT_COSINE = flags.DEFINE_bool(
    'log_gradient_cosine', False, 'Diagnostic: at each evaluation, the '
    "cosine of a fresh gradient estimate (the round's clients' first "
    'batches, the run\'s K, estimator and directions) to their backprop '
    'gradient, the cosine predicted from the clients\' gradient norms and '
    'the sqrt(K/n) of one gradient (baffle.estimate_cosine_to_gradient; it '
    'backpropagates, outside the federated round).')
_RECIPE = flags.DEFINE_enum(
    'recipe', 'none', ['none', 'paper', 'budget'],
    "'paper': the official code's MNIST recipe (PAPER_RECIPE); 'budget': "
    'LeNet trained on a forward-pass budget with many cheap rounds '
    '(BUDGET_RECIPE); flags given explicitly override it.')

# The official code's README command for LeNet on MNIST
# (`main.py --K 100 --dataset MNIST --epochs 20 --lr 1e-2 --optimizer Adam
# --ema --normalization NoNorm`) with its defaults: 10 IID clients, all in
# every round, batch 32, sigma 1e-4, forward differences, Adam betas
# (0.9, 0.99) and weight decay 5e-4 (torch's eps 1e-8), each client's
# estimate clipped to inf-norm 0.3, EMA 0.995 once per epoch with torch_ema's
# warm-up, MNIST resized to 32x32, and each client drawing its own
# directions (torch.randn on every client). `--mode=one_epoch` (its
# `--fedopt FedAvg`) gets a local Adam at 1e-2 per client (fresh each round here: TFF clients
# keep no state) and a server that averages the models (SGD 1.0).
PAPER_RECIPE = dict(
    model='lenet', K=100, sigma=1e-4, estimator='forward', lr=1e-2,
    clip=0.0, client_clip=0.3, weight_decay=5e-4, adam_beta1=0.9,
    adam_beta2=0.99, adam_epsilon=1e-8, ema=0.995, ema_every=0,
    ema_warmup=True, epochs=20, num_clients=10, clients_per_round=10,
    dirichlet_alpha='iid', batch_size=32, resize_digits=True,
    client_optimizer='adam', client_lr=1e-2, directions='per_client')
_PAPER_ONE_EPOCH = dict(lr=1.0, directions='shared')

# Forward-only training on a forward-pass budget (README, "BAFFLE on a
# forward-pass budget"): the paper recipe's clients and data, the budget
# spent on many cheap rounds: K=10 central differences (21 passes a round),
# sigma 1e-3 (float32 finite differences of a loss near 2 lose digits at
# 1e-4), server Adam 1e-2 with beta_1 0.97 (momentum averages the estimates
# of ~30 rounds) and a cosine decay over the run; no clipping, weight decay
# or EMA. Shared directions: any aggregator applies (secure sums, DP).
BUDGET_RECIPE = dict(
    model='lenet', K=10, sigma=1e-3, estimator='central', lr=1e-2,
    optimizer='adam', adam_beta1=0.97, lr_schedule='cosine',
    clip=0.0, client_clip=0.0, weight_decay=0.0, ema=0.0,
    forward_passes=130_000, eval_every=260, num_clients=10,
    clients_per_round=10, dirichlet_alpha='iid', batch_size=32,
    resize_digits=True, client_optimizer='adam', client_lr=1e-2,
    directions='shared')
RECIPES = {'paper': PAPER_RECIPE, 'budget': BUDGET_RECIPE}


# Each sets the number of rounds.
_LENGTH_FLAGS = ('rounds', 'epochs', 'forward_passes')


def _explicit_length_flags() -> list[str]:
  # --epochs=0 and --forward_passes=0 mean "not set".
  return [name for name in _LENGTH_FLAGS
          if not flags.FLAGS[name].using_default_value
          and flags.FLAGS[name].value]


def apply_recipe() -> dict[str, Any]:
  """Sets the flags of --recipe that were not given explicitly.

  Returns:
    The flags set (name -> value).
  """
  if _RECIPE.value == 'none':
    return {}
  recipe = dict(RECIPES[_RECIPE.value])
  if _RECIPE.value == 'paper' and _MODE.value == 'one_epoch':
    recipe.update(_PAPER_ONE_EPOCH)
  if _explicit_length_flags():  # The run's length is the user's.
    for name in _LENGTH_FLAGS:
      recipe.pop(name, None)
  applied = {}
  for name, value in recipe.items():
    if flags.FLAGS[name].using_default_value:
      flags.FLAGS[name].value = value
      applied[name] = value
  return applied

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


def validate_flags() -> None:
  """Raises experiment.FlagError naming the first bad flag."""
  apply_recipe()
  experiment.required_output_dir()
  experiment.validate_execution_flags()  # First: it names a nan as such.
  experiment.require_positive(
      _K, _SIGMA, _ROUNDS, _CLIENTS_PER_ROUND, _NUM_CLIENTS, _BATCH_SIZE, _LR,
      _CLIENT_LR, _EVAL_EVERY, _PARALLEL, _DP_CLIP)
  experiment.require_positive(
      _CLIP, _DP_NOISE, _CLIENT_CLIP, _WEIGHT_DECAY, _EMA_EVERY, _EPOCHS,
      _ADAM_EPSILON, _FORWARD_PASSES, allow_zero=True)
  explicit = _explicit_length_flags()
  if len(explicit) > 1:
    raise experiment.FlagError(
        f'{" and ".join("--" + name for name in explicit)} each set the '
        'rounds; give one.')
  experiment.require_unit_interval(_ADAM_BETA1, _ADAM_BETA2, _EMA,
                                   _MOMENTUM)
  experiment.require_positive(_WARMUP_ROUNDS, allow_zero=True)
  if not _EPOCHS.value and not _FORWARD_PASSES.value:
    check_warmup(_ROUNDS.value)  # Else the rounds are known with the data.
  if _MOMENTUM.value and server_optimizer_name() == 'adam':
    raise experiment.FlagError(
        '--momentum applies to --optimizer=sgd|nesterov; '
        "Adam's is --adam_beta1.")
  if _DIRECTIONS.value == 'per_client' and _MODE.value != 'fedsgd':
    raise experiment.FlagError(
        '--directions=per_client applies to --mode=fedsgd (one_epoch '
        'clients already draw their own).')
  if _DIRECTIONS.value == 'per_client' and _AGGREGATOR.value == 'dp':
    raise experiment.FlagError(
        '--directions=per_client cannot use --aggregator=dp: the server '
        "rebuilds each client's estimate from its own scores; use "
        '--directions=shared.')
  experiment.require_dp_delta()
  experiment.validate_task_flags()


def check_warmup(rounds: int) -> None:
  """FlagError unless --warmup_rounds is below the run's `rounds`."""
  if _WARMUP_ROUNDS.value >= rounds:
    raise experiment.FlagError(
        f'--warmup_rounds={_WARMUP_ROUNDS.value} must be below the run\'s '
        f'{rounds} rounds.')


def _plot(history: dict[int, dict[str, float]], key: str, path: str,
          title: str) -> None:
  rounds = sorted(r for r in history if key in history[r])
  experiment.plot_series(path, title, [dict(
      rounds=rounds, values=[history[r][key] for r in rounds],
      ylabel='test accuracy', ylim=(0, 1), hlines=[(0.1, 'chance')])])


def rounds_per_epoch_of(task: experiment.TrainingTask) -> int:
  """Rounds of one epoch: a whole local epoch per round in one_epoch mode;
  in fedsgd (one batch per client and round) ceil(mean examples of a client
  / --batch_size), the mean over (at most 20 of) the training clients."""
  if _MODE.value == 'one_epoch':
    return 1
  client_ids = list(task.train.client_ids)[:20]
  sizes = [int(task.train.create_tf_dataset_for_client(c).reduce(
      0, lambda n, _: n + 1)) for c in client_ids]
  return max(1, int(np.ceil(np.mean(sizes) / _BATCH_SIZE.value)))


def forward_passes_per_client_per_round(task: experiment.TrainingTask
                                        ) -> float:
  """`baffle.forward_passes_per_step` times a client's steps per round: 1
  in fedsgd; in one_epoch one per batch of its round's data, the mean over
  (at most 20 of) the training clients."""
  per_step = baffle.forward_passes_per_step(_ESTIMATOR.value, _K.value)
  if _MODE.value == 'fedsgd':
    return float(per_step)
  steps = [int(task.preprocess_train(
      task.train.create_tf_dataset_for_client(c), 0).reduce(
          0, lambda n, _: n + 1)) for c in list(task.train.client_ids)[:20]]
  return float(per_step * np.mean(steps))


_WITHOUT_EMA_KEY = 'evaluation/without_ema/central/accuracy'
_TRAIN_ACCURACY_KEY = 'client_work/train/accuracy'
_TRAIN_EXAMPLES_KEY = 'client_work/train/num_examples'


def _cosine_key(field: str) -> str:
  """The metrics key of a field of `baffle.estimate_cosine_to_gradient`."""
  return f'evaluation/gradient_cosine/{field}'


def _diagnostics_by_round(history: dict[int, dict[str, float]]
                          ) -> collections.OrderedDict:
  """The summary's fields for --ema (the raw weights' accuracy) and
  --log_gradient_cosine, by evaluated round; none if off."""
  def by_round(key):
    return {str(r): history[r][key] for r in sorted(history)
            if key in history[r]}

  fields = collections.OrderedDict()
  if _EMA.value:
    fields['accuracy_by_round_without_ema'] = by_round(_WITHOUT_EMA_KEY)
    fields['final_test_accuracy_without_ema'] = history[max(history)].get(
        _WITHOUT_EMA_KEY)
  if _LOG_GRADIENT_COSINE.value:
    fields['gradient_cosine_by_round'] = by_round(_cosine_key('cosine'))
    fields['expected_gradient_cosine'] = next(iter(
        by_round(_cosine_key('expected_cosine')).values()), None)
    fields['predicted_gradient_cosine_by_round'] = by_round(
        _cosine_key('predicted_cosine'))
  return fields


def train_accuracy(history: dict[int, dict[str, float]], rounds: int,
                    rounds_per_epoch: int) -> Optional[float]:
  """The clients' accuracy on their own batches (at the weights each round
  starts from) over the last epoch's rounds, example-weighted; None if the
  model has no accuracy metric."""
  last = [history[r] for r in range(max(1, rounds - rounds_per_epoch + 1),
                                    rounds + 1) if r in history]
  pairs = [(m[_TRAIN_ACCURACY_KEY], m.get(_TRAIN_EXAMPLES_KEY, 1.0))
           for m in last if _TRAIN_ACCURACY_KEY in m]
  if not pairs:
    return None
  return sum(a * n for a, n in pairs) / sum(n for _, n in pairs)


def adam_from_flags(learning_rate: float) -> tff.learning.optimizers.Optimizer:
  """TFF's Adam with --adam_beta1, --adam_beta2 and --adam_epsilon."""
  return tff.learning.optimizers.build_adam(
      learning_rate, beta_1=_ADAM_BETA1.value, beta_2=_ADAM_BETA2.value,
      epsilon=_ADAM_EPSILON.value)


def server_optimizer_from_flags(rounds: int
                                ) -> tff.learning.optimizers.Optimizer:
  """--optimizer at --lr, scheduled by --lr_schedule and
  --warmup_rounds over `rounds` steps (BAFFLE's server, and the experiments'
  backprop FedSGD's)."""
  name = server_optimizer_name()
  if name == 'adam':
    optimizer = adam_from_flags(_LR.value)
  elif name == 'nesterov':
    optimizer = fad_optimizers.build_nesterov_sgdm(_LR.value,
                                                   _MOMENTUM.value)
  else:
    optimizer = tff.learning.optimizers.build_sgdm(
        _LR.value, _MOMENTUM.value or None)
  if _LR_SCHEDULE.value == 'constant' and not _WARMUP_ROUNDS.value:
    return optimizer
  return tff.learning.optimizers.schedule_learning_rate(
      optimizer, fad_optimizers.learning_rate_schedule(
          _LR.value, rounds, _LR_SCHEDULE.value, _WARMUP_ROUNDS.value))


def server_optimizer_name() -> str:
  """--optimizer, or its default for --mode."""
  if _OPTIMIZER.value:
    return _OPTIMIZER.value
  return 'adam' if _MODE.value == 'fedsgd' else 'sgd'


def client_optimizer_from_flags() -> tff.learning.optimizers.Optimizer:
  """--client_optimizer at --client_lr (one_epoch's local optimizer, and
  the experiments' backprop FedAvg's)."""
  if _CLIENT_OPTIMIZER.value == 'adam':
    return adam_from_flags(_CLIENT_LR.value)
  return tff.learning.optimizers.build_sgdm(_CLIENT_LR.value)


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
  task = experiment.load_task(pad_digits_to_32x32=_MODEL.value != 'linear',
                              resize_digits=_RESIZE_DIGITS.value)
  model = task.model
  rounds_per_epoch = rounds_per_epoch_of(task)
  passes_per_round = forward_passes_per_client_per_round(task)
  if _FORWARD_PASSES.value:
    rounds = int(_FORWARD_PASSES.value // passes_per_round)
    if rounds < 1:
      raise experiment.FlagError(
          f'--forward_passes={_FORWARD_PASSES.value} pays for no round: one '
          f'costs {passes_per_round:g} per client.')
  elif _EPOCHS.value:
    rounds = _EPOCHS.value * rounds_per_epoch
  else:
    rounds = _ROUNDS.value
  ema_every = _EMA_EVERY.value or rounds_per_epoch
  check_warmup(rounds)

  if _AGGREGATOR.value == 'dp':
    aggregator = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=_DP_NOISE.value, clients_per_round=float(
            _CLIENTS_PER_ROUND.value), clip=_DP_CLIP.value)
  elif _DIRECTIONS.value == 'per_client':
    aggregator = None  # Its own aggregation (build_baffle).
  else:
    aggregator = tff.aggregators.MeanFactory()
  server_optimizer = server_optimizer_from_flags(rounds)
  # Only 'one_epoch' clients take local steps.
  client_optimizer = (client_optimizer_from_flags()
                      if _MODE.value == 'one_epoch' else None)
  private = _AGGREGATOR.value == 'dp'
  process = baffle.build_baffle(
      model, client_optimizer,
      server_optimizer, model_aggregator=aggregator,
      # Under DP the training metrics (plain sums) are not released.
      metrics_aggregator=fm.release_no_metrics if private else None,
      num_perturbations=_K.value, sigma=_SIGMA.value,
      estimator=_ESTIMATOR.value, mode=_MODE.value,
      clip_value=_CLIP.value or None, ema_decay=_EMA.value or None,
      parallel_perturbations=_PARALLEL.value, seed=_SEED.value,
      client_clip_inf_norm=_CLIENT_CLIP.value or None,
      weight_decay=_WEIGHT_DECAY.value, ema_every=ema_every,
      ema_warmup=_EMA_WARMUP.value, directions=_DIRECTIONS.value)
  # Every byte a client sends in a round: its scores (or update), the
  # aggregation weight and the metrics' sums.
  upload = tff_fad.communication_cost(
      process.next, _CLIENTS_PER_ROUND.value).client_to_server_bytes_per_client

  report = None
  if private:
    report = baffle.round_privacy_report(
        model, num_perturbations=_K.value, model_aggregator=aggregator,
        mode=_MODE.value, metrics_released=False,
        sampling_rate=_CLIENTS_PER_ROUND.value / _NUM_CLIENTS.value,
        rounds=rounds, delta=experiment.DP_DELTA.value)

  # fedsgd uses one minibatch per client and round.
  select_clients = experiment.client_selector(
      task, clients_per_round=_CLIENTS_PER_ROUND.value, seed=_SEED.value,
      batches_per_client=1 if _MODE.value == 'fedsgd' else None)
  evaluate_weights = experiment.evaluator(task, experiment.EVAL_CLIENTS.value)

  def evaluate(state, unused_data) -> collections.OrderedDict:
    result = evaluate_weights(process.get_model_weights(state))
    if _EMA.value:  # The EMA is evaluated; the weights it averages as well.
      result['without_ema'] = evaluate_weights(state.global_model_weights)
    if _LOG_GRADIENT_COSINE.value:
      result['gradient_cosine'] = gradient_cosine(state)
    return result

  def gradient_cosine(state) -> collections.OrderedDict:
    # The weights and clients of the round that starts from `state`.
    next_round = int(state.finalizer['round_num']) + 1
    batches = [next(iter(dataset)) for dataset in select_clients(next_round)]
    return baffle.estimate_cosine_to_gradient(
        model, state.global_model_weights, batches,
        num_perturbations=_K.value, sigma=_SIGMA.value,
        estimator=_ESTIMATOR.value,
        directions=('per_client' if _MODE.value == 'one_epoch'
                    else _DIRECTIONS.value),
        seed=next_round)

  progress = experiment.ProgressReleaseManager(rounds, [
      ('train_loss', 'client_work/train/loss', '.4f'),
      ('estimate_norm', 'gradient_estimate/norm', '.3f'),
      ('test_acc', experiment.CENTRAL_ACCURACY_KEY, '.4f'),
      ('fed_test_acc', 'evaluation/federated/accuracy', '.4f'),
      ('test_acc_without_ema', _WITHOUT_EMA_KEY, '.4f'),
      ('estimate_cosine', _cosine_key('cosine'), '.3f'),
      ('predicted_cosine', _cosine_key('predicted_cosine'), '.3f'),
      ('expected_cosine', _cosine_key('expected_cosine'), '.3f'),
  ])
  recipe = (f'recipe {_RECIPE.value}, ' if _RECIPE.value != 'none' else '')
  print(f'BAFFLE: {recipe}{task.description}, K={_K.value}, '
        f'estimator={_ESTIMATOR.value}, '
        f'mode={_MODE.value}, {rounds} rounds x '
        f'{_CLIENTS_PER_ROUND.value} clients ({rounds_per_epoch} rounds per '
        f'epoch); upload {upload} bytes and {passes_per_round:g} forward '
        f'passes per client per round ({passes_per_round * rounds:,g} in '
        'all)', flush=True)
  if report is not None:
    experiment.print_privacy(report)
  state, resumed_from, final = experiment.train(
      process, select_clients, output_dir=output_dir, rounds=rounds,
      evaluate=evaluate, eval_every=_EVAL_EVERY.value, progress=progress,
      flag_values=experiment.flag_values(__name__))
  history = experiment.read_metrics(output_dir)  # Includes resumed rounds.
  accuracy_key, test_summary = experiment.final_evaluation(
      final, history, rounds)
  plot_path = os.path.join(output_dir, 'accuracy.png')
  _plot(history, accuracy_key, plot_path,
        f'BAFFLE {_ESTIMATOR.value}, K={_K.value}, {task.description}')
  summary = collections.OrderedDict(
      task=task.description,
      **test_summary,
      rounds=rounds,
      forward_passes_per_client_per_round=passes_per_round,
      forward_passes_per_client=passes_per_round * rounds,
      final_train_accuracy=train_accuracy(history, rounds, rounds_per_epoch),
      upload_bytes_per_client_per_round=upload,
      privacy=experiment.privacy_summary(report),
      upload_scalars_per_client_per_round=(
          _K.value if _MODE.value == 'fedsgd' else task.num_params),
      num_params=task.num_params,
      **_diagnostics_by_round(history),
      resumed_from_round=resumed_from,
      **experiment.wall_time(start, history, resumed_from),
      flags=experiment.flag_values(__name__))
  summary = run_dir.write_summary(output_dir, summary, history)
  trained = experiment.training_time(summary, resumed_from, rounds)
  print(f"Final test accuracy ({test_summary['test_accuracy_from']}): "
        f"{test_summary['final_test_accuracy']:.4f} (after "
        f'{rounds} rounds, {passes_per_round * rounds:,g} forward passes per '
        f'client, {trained})')
  print(f'Outputs written to {os.path.abspath(output_dir)}: metrics.csv, '
        'tensorboard/, accuracy.png, summary.json')
  return summary


def main(argv: list[str]) -> None:
  experiment.run_main(run, argv)


if __name__ == '__main__':
  app.run(main)
