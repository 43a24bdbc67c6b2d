r"""Tunes FedAvg's server learning rate by a DP forward-mode hypergradient.

A tiny federated linear regression. Each round the server sends the model
`w`, clients send a local update `u_i` (one gradient step), aggregated with
DP-Gaussian (`gaussian_fixed`): `u`. The new model is `w + lr * u`, and the
clients' losses at it are aggregated with DP-Gaussian too. A forward-mode
derivative w.r.t. `lr` (tangent 1) makes the same program also release the
hypergradient `dL/dlr = <grad L_i(w + lr u), u>`, aggregated by its own
DP-Gaussian factory; the server then takes a step on `lr`. The privacy
report counts the three DP releases per round and prints (epsilon, delta):

  python -m research.dp_hypergradient.main --rounds 10 --output_dir out/dp

With --output_dir it also writes metrics.csv (round, loss, dloss/dlr, the
learning rate the round used) and summary.json (the privacy report's figures,
the final learning rate and the flags).
"""

import collections
import csv
import json
import math
import os
import sys
from typing import Any, Callable

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad  # Also stops TFF's worker process at exit.
from tff_fad import aggregation

# Flags live in their own FlagValues so this binary can be imported next to
# others defining the same names (e.g. in one test process).
FLAGS = flags.FlagValues()

# Federated setting and data.
# Bounds are checked when the flags are parsed: a bad value is a one-line
# error before any work.
_ROUNDS = flags.DEFINE_integer(
    'rounds', 10, 'Training rounds.', lower_bound=1, flag_values=FLAGS)
_NUM_CLIENTS = flags.DEFINE_integer(
    'num_clients', 20, 'Clients per round.', lower_bound=1, flag_values=FLAGS)
_EXAMPLES = flags.DEFINE_integer(
    'examples_per_client', 16, 'Examples per client.', lower_bound=1,
    flag_values=FLAGS)
_SEED = flags.DEFINE_integer('seed', 0, 'Data seed.', flag_values=FLAGS)
# Learning rates.
_CLIENT_LR = flags.DEFINE_float(
    'client_lr', 0.1, 'Client step size.', flag_values=FLAGS)
_SERVER_LR = flags.DEFINE_float(
    'server_lr', 0.2, 'Initial server learning rate.', flag_values=FLAGS)
_HYPER_LR = flags.DEFINE_float(
    'hyper_lr', 0.05, 'Step size on the server learning rate.',
    flag_values=FLAGS)
# Differential privacy.
_NOISE = flags.DEFINE_float(
    'noise_multiplier', 1.0, 'Noise multiplier of each DP-Gaussian release.',
    flag_values=FLAGS)
_UPDATE_CLIP = flags.DEFINE_float(
    'update_clip', 2.0, 'L2 clip of the client updates.', flag_values=FLAGS)
_LOSS_CLIP = flags.DEFINE_float(
    'loss_clip', 5.0, 'Clip of the client losses and hypergradient scalars.',
    flag_values=FLAGS)
_SAMPLING_RATE = flags.DEFINE_float(
    'sampling_rate', 0.01, 'For the accounting: the rate at which each '
    "round's clients are Poisson-sampled from the population.",
    flag_values=FLAGS)
_DELTA = flags.DEFINE_float('delta', 1e-5, 'Target delta.', flag_values=FLAGS)
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Where to write metrics.csv and summary.json (created '
    'if missing; those two files are replaced). Unset: print only.',
    flag_values=FLAGS)


def _require(name: str, holds: Callable[[float], bool], what: str) -> None:
  flags.register_validator(
      name, lambda value: math.isfinite(value) and holds(value),
      f'must be a finite number {what}.', flag_values=FLAGS)


_require('noise_multiplier', lambda noise: noise >= 0, '>= 0')
_require('update_clip', lambda clip: clip > 0, '> 0')
_require('loss_clip', lambda clip: clip > 0, '> 0')
_require('sampling_rate', lambda rate: 0 < rate <= 1, 'in (0, 1]')
_require('delta', lambda delta: 0 < delta < 1, 'in (0, 1)')

DIM = 3


def make_data(num_clients: int, examples: int, seed: int):
  """Client data `{'x': [n, DIM], 'y': [n]}` of y = x . w_true + noise."""
  rng = np.random.default_rng(seed)
  w_true = np.array([1.0, -2.0, 0.5], np.float32)
  data = []
  for _ in range(num_clients):
    x = rng.normal(size=(examples, DIM)).astype(np.float32)
    y = (x @ w_true + 0.1 * rng.normal(size=examples)).astype(np.float32)
    data.append(collections.OrderedDict(x=x, y=y))
  return data


def client_loss(w: tf.Tensor, batch: Any) -> tf.Tensor:
  return tf.reduce_mean((tf.linalg.matvec(batch['x'], w) - batch['y'])**2)


def build_round(num_clients: int, examples: int, client_lr: float):
  """The round program and its aggregation points."""
  dpf = tff.aggregators.DifferentiallyPrivateFactory

  def dp(clip):
    return dpf.gaussian_fixed(_NOISE.value, num_clients, clip)

  update_point = aggregation.AggregationPoint(
      dp(_UPDATE_CLIP.value), tff.TensorType(np.float32, [DIM]),
      name='model_update')
  loss_point = aggregation.AggregationPoint(
      dp(_LOSS_CLIP.value), np.float32,
      tangent_factory=dp(_LOSS_CLIP.value), name='loss')
  batch = collections.OrderedDict(
      x=tff.TensorType(np.float32, [examples, DIM]),
      y=tff.TensorType(np.float32, [examples]))

  def local_update(w, b):
    with tf.GradientTape() as tape:
      tape.watch(w)
      loss = client_loss(w, b)
    return -client_lr * tape.gradient(loss, w)

  @tff_fad.federated_computation(
      tff.FederatedType(tff.TensorType(np.float32, [DIM]), tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      update_point.state_type, loss_point.state_type,
      tff.FederatedType(batch, tff.CLIENTS))
  def fedavg_round(w, lr, update_state, loss_state, data):
    w_clients = tff_fad.federated_broadcast(w)
    update = aggregation.aggregate_with_factory(
        tff_fad.federated_map(local_update, (w_clients, data)),
        update_state, update_point)
    new_w = tff_fad.federated_apply(lambda w, lr, u: w + lr * u,
                                    (w, lr, update.result))
    losses = tff_fad.federated_map(
        client_loss, (tff_fad.federated_broadcast(new_w), data))
    loss = aggregation.aggregate_with_factory(losses, loss_state, loss_point)
    return loss.result, (new_w, update.state, loss.state)

  return fedavg_round, update_point, loss_point


def run() -> aggregation.PrivacyReport:
  """Trains with the flags' settings; returns the privacy report."""
  data = make_data(_NUM_CLIENTS.value, _EXAMPLES.value, _SEED.value)
  fedavg_round, update_point, loss_point = build_round(
      _NUM_CLIENTS.value, _EXAMPLES.value, _CLIENT_LR.value)
  # The forward-mode derivative w.r.t. lr: (loss, dloss/dlr, aux).
  hyper_round = tff_fad.jvp(fedavg_round, wrt='lr', has_aux=True)
  w = np.zeros(DIM, np.float32)
  lr = np.float32(_SERVER_LR.value)
  update_state, loss_state = update_point.initialize(), loss_point.initialize()
  rows = []
  for round_num in range(1, _ROUNDS.value + 1):
    loss, hypergrad, (w, update_state, loss_state) = hyper_round(
        w, lr, update_state, loss_state, data, np.float32(1.0))
    print(f'round {round_num:3d}: loss {loss:8.4f}  dloss/dlr '
          f'{hypergrad:8.4f}  lr {lr:.4f}')
    rows.append((round_num, float(loss), float(hypergrad), float(lr)))
    lr = np.float32(max(lr - _HYPER_LR.value * hypergrad, 0.0))
  report = aggregation.privacy_report(
      fedavg_round, mode='forward', wrt='lr',
      sampling_rate=_SAMPLING_RATE.value, rounds=_ROUNDS.value,
      delta=_DELTA.value)
  print(report)
  if _OUTPUT_DIR.value:
    _write_outputs(_OUTPUT_DIR.value, rows, report, float(lr))
  return report


def _write_outputs(output_dir: str, rows, report, final_lr: float) -> None:
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'metrics.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['round', 'loss', 'hypergradient', 'server_learning_rate'])
    writer.writerows(rows)
  summary = collections.OrderedDict(
      final_loss=rows[-1][1], initial_server_learning_rate=_SERVER_LR.value,
      final_server_learning_rate=final_lr,
      privacy=report.summary(_NOISE.value),
      flags={name: FLAGS[name].value for name in sorted(FLAGS)})
  with open(os.path.join(output_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(f'Outputs written to {os.path.abspath(output_dir)}: metrics.csv, '
        'summary.json')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tff_fad.runtime.set_up_entry_point()  # No signal leaks TFF's worker.
  run()


def parse_flags(argv):
  """Parses this binary's flags (absl's app.run needs FLAGS parsed too)."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    # As absl's own parser: a one-line error, no traceback.
    sys.stderr.write(f'FATAL Flags parsing error: {e}\n')
    sys.exit(1)
  flags.FLAGS.mark_as_parsed()
  return rest


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
