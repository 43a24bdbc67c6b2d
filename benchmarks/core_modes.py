r"""Cost of federated AD's accumulation modes, measured side by side.

For an MLP (784-128-10, 101,770 parameters) on 10 and 100 clients:
  * the tff_fad primal vs a hand-written `tff.federated_computation` of the
    same math (the overhead tff_fad adds to the program it emits);
  * `value_and_grad` in 'reverse' and 'reverse_recompute' mode, and a
    forward-mode `jvp` with 1 and 16 tangent directions (16 also seeded:
    only a seed is broadcast), each divided by the primal's time;
  * a Hessian-vector product, `jvp(grad(loss))` (forward over reverse and
    over reverse_recompute), divided by the primal's and the gradient's time;
  * bytes and communication steps from `communication_cost`.

All variants run in one process, interleaved in a random order per repeat,
after a warm-up call each; a figure is the median of `--repeats` timed calls. Forward mode gives a full
gradient only by pushing one direction per parameter (101,770 here), so it is
timed per direction, not as a gradient.

  python -m benchmarks.core_modes --output benchmarks/results/core_modes.json
"""

import collections
import json
import os
import statistics
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad

_CLIENTS = flags.DEFINE_list('clients', ['10', '100'], 'Client counts.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per variant.')
_EXAMPLES = flags.DEFINE_integer('examples_per_client', 16,
                                 'Examples held by each client.')
_OUTPUT = flags.DEFINE_string(
    'output', 'benchmarks/results/core_modes.json', 'Where to write JSON.')

HIDDEN = 128
PARAMS = collections.OrderedDict(
    w1=tff.TensorType(np.float32, [784, HIDDEN]),
    b1=tff.TensorType(np.float32, [HIDDEN]),
    w2=tff.TensorType(np.float32, [HIDDEN, 10]),
    b2=tff.TensorType(np.float32, [10]),
)


def _data_type(examples):
  return collections.OrderedDict(
      x=tff.TensorType(np.float32, [examples, 784]),
      y=tff.TensorType(np.int32, [examples]))


def mlp_loss(params, batch):
  hidden = tf.nn.relu(batch['x'] @ params['w1'] + params['b1'])
  logits = hidden @ params['w2'] + params['b2']
  return tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(batch['y'], logits))


def build_programs(examples):
  server = tff.FederatedType(PARAMS, tff.SERVER)
  clients = tff.FederatedType(_data_type(examples), tff.CLIENTS)

  @tff_fad.federated_computation(server, clients)
  def fad_loss(params, data):
    return tff_fad.federated_mean(tff_fad.federated_map(
        mlp_loss, (tff_fad.federated_broadcast(params), data)))

  local_loss = tff.tensorflow.computation(
      lambda params, batch: mlp_loss(params, batch), PARAMS,
      _data_type(examples))

  @tff.federated_computation(server, clients)
  def hand_written_loss(params, data):
    return tff.federated_mean(tff.federated_map(
        local_loss, (tff.federated_broadcast(params), data)))

  return fad_loss, hand_written_loss


def _values(num_clients, examples, seed=0):
  rng = np.random.default_rng(seed)
  params = collections.OrderedDict(
      (k, (rng.normal(size=t.shape) * 0.05).astype(np.float32))
      for k, t in PARAMS.items())
  data = [collections.OrderedDict(
      x=rng.random((examples, 784), dtype=np.float32),
      y=rng.integers(0, 10, examples).astype(np.int32))
          for _ in range(num_clients)]
  return params, data


def _directions(params, k, seed=1):
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(
      (key, rng.normal(size=(k,) + v.shape).astype(np.float32))
      for key, v in params.items())


def measure(num_clients, examples, repeats):
  fad_loss, hand_written = build_programs(examples)
  params, data = _values(num_clients, examples)
  variants = collections.OrderedDict([
      ('primal (hand-written TFF)', (hand_written, (params, data))),
      ('primal (tff_fad)', (fad_loss.primal, (params, data))),
      ('value_and_grad reverse',
       (tff_fad.value_and_grad(fad_loss, mode='reverse'), (params, data))),
      ('value_and_grad reverse_recompute',
       (tff_fad.value_and_grad(fad_loss, mode='reverse_recompute'),
        (params, data))),
      ('jvp forward, 1 direction',
       (tff_fad.jvp(fad_loss),
        (params, data, tf.nest.map_structure(lambda d: d[0],
                                             _directions(params, 1))))),
      ('jvp forward, 16 directions',
       (tff_fad.jvp(fad_loss, num_directions=16),
        (params, data, _directions(params, 16)))),
      ('jvp forward, 16 seeded directions',
       (tff_fad.jvp(fad_loss, num_directions=16, tangent_seed=True),
        (params, data, np.array([1, 2], np.int64)))),
      # Second order: a Hessian-vector product, forward over reverse (the
      # gradient's program, differentiated again).
      ('hvp forward-over-reverse',
       (tff_fad.jvp(tff_fad.grad(fad_loss, mode='reverse')),
        (params, data, tf.nest.map_structure(lambda d: d[0],
                                             _directions(params, 1))))),
      ('hvp forward-over-reverse_recompute',
       (tff_fad.jvp(tff_fad.grad(fad_loss, mode='reverse_recompute')),
        (params, data, tf.nest.map_structure(lambda d: d[0],
                                             _directions(params, 1))))),
  ])
  for comp, args in variants.values():  # Warm-up: tracing, worker start.
    comp(*args)
  times = collections.defaultdict(list)
  order = np.random.default_rng(0)
  for _ in range(repeats):
    # Interleaved in a fresh random order each repeat, so neither drift nor
    # the variant run just before favours one variant.
    for name in order.permutation(list(variants)):
      comp, args = variants[name]
      start = time.perf_counter()
      comp(*args)
      times[name].append(time.perf_counter() - start)
  primal = statistics.median(times['primal (tff_fad)'])
  gradient = statistics.median(times['value_and_grad reverse'])
  rows = []
  for name, (comp, _) in variants.items():
    median = statistics.median(times[name])
    report = tff_fad.communication_cost(comp, num_clients)
    rows.append(collections.OrderedDict(
        clients=num_clients,
        variant=name,
        seconds=median,
        ratio_to_tff_fad_primal=median / primal,
        ratio_to_reverse_gradient=median / gradient,
        down_bytes_per_client=report.server_to_client_bytes_per_client,
        up_bytes_per_client=report.client_to_server_bytes_per_client,
        communication_steps=report.communication_steps,
        round_trips=report.round_trips,
    ))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tff_fad.runtime.set_up_entry_point()  # No signal leaks TFF's worker.
  num_params = sum(int(np.prod(t.shape)) for t in PARAMS.values())
  rows = []
  for clients in _CLIENTS.value:
    rows.extend(measure(int(clients), _EXAMPLES.value, _REPEATS.value))
  header = (f'{"clients":>7}  {"variant":<34} {"median s":>9} {"/primal":>8} '
            f'{"/grad":>6} {"down B/client":>13} {"up B/client":>11} '
            f'{"steps":>5}')
  print(f'MLP 784-{HIDDEN}-10 ({num_params:,} parameters), '
        f'{_EXAMPLES.value} examples per client, median of '
        f'{_REPEATS.value} calls')
  print(header)
  for r in rows:
    print(f'{r["clients"]:>7}  {r["variant"]:<34} {r["seconds"]:>9.3f} '
          f'{r["ratio_to_tff_fad_primal"]:>8.2f} '
          f'{r["ratio_to_reverse_gradient"]:>6.2f} '
          f'{r["down_bytes_per_client"]:>13,} {r["up_bytes_per_client"]:>11,} '
          f'{r["communication_steps"]:>5}')
  os.makedirs(os.path.dirname(_OUTPUT.value) or '.', exist_ok=True)
  with open(_OUTPUT.value, 'w') as f:
    json.dump({'num_parameters': num_params, 'repeats': _REPEATS.value,
               'examples_per_client': _EXAMPLES.value, 'rows': rows}, f,
              indent=2)
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
