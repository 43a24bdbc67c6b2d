r"""Round time vs clients per round, on one process and on 1 or 2 workers.

On the embedded digits (4,000 training images split IID into 1,000 clients of
4 images, linear model, 7,850 parameters), one training round of

  * hypergradient FedAvg (forward mode: the hypergradient rides on the
    round's broadcast), `tff_fad.learning.build_hypergradient_fed_avg`, with
    the default post-update loss of each client's first batch (its gradient
    is the first local step's) and with `post_update_loss='all_batches'` (a
    second pass over the client's data);
  * BAFFLE (K=`--K` perturbations, forward estimator, one batch per client),
    `tff_fad.learning.build_baffle`;
  * hypergradient FedAvg in reverse mode (`hypergradient_fed_avg_reverse`):
    the backward sweep is a second aggregation, so on workers the round runs
    as two stages (`tff_fad.stages`);
  * the gradient of the 2-round FedAvg loss w.r.t. the initial model
    (`fed_avg_2_rounds_gradient`, 'reverse_recompute': six stages), with
    each client's 4 images as one tensor batch and two local steps;
  * TFF's own `tff.learning.algorithms.build_weighted_fed_avg`, the baseline;
  * a call that only receives the clients' data and counts the clients
    (`client_tensors_only`, `client_datasets_only`): what each stage pays to
    send the client data to the workers again;

with 10, 100 and 1,000 clients per round, in six execution contexts:

  * `local`: TFF's default context (the C++ runtime in one worker process
    TFF starts itself);
  * `1 worker` / `2 workers`: a `tff_fad.workers` context over local
    `worker_binary` services started by `tff_fad.local_workers.LocalWorkers`,
    each round's clients split between them by TFF's mergeable context;
  * the same with each worker pinned to one core (`sched_setaffinity`): one
    worker's TensorFlow thread pools already use every core of this machine,
    so only pinned workers show what splitting a round buys when each worker
    has a machine (here, a core) of its own;
  * 2 pinned workers behind TLS fronts
    (`tff_fad.served_workers.ServedWorkers`, what `python -m
    tff_fad.local_workers serve` runs on each machine of a cluster), each front pinned to its worker's core, the driver connecting
    with mutual TLS: `tls_over_plaintext_2_pinned_workers` is what
    encryption and authentication cost a round.

For each number of clients, every algorithm builds its process and client
data once and runs one warm-up round in every context (compilation, executor
set-up); then every (algorithm, context) pair is timed in a fresh random
order per repeat, `--repeats` rounds each, from the same state on the same
clients, so algorithms and contexts are compared side by side. A figure is the median. The
ratios divide by TFF FedAvg's local time at the same number of clients (cost
of the algorithm), and the 1-worker by the 2-worker time (gain from a second
worker), unpinned and pinned. Client datasets are built in the driver and
sent to the workers with the computation, as in TFF simulations; the driver
shares the machine's cores with the workers.

  python -m benchmarks.scaling   # writes benchmarks/results/scaling.json
  make bench-stages   # programs in stages: benchmarks/results/scaling_stages.json
"""

import collections
import contextlib
import functools
import json
import os
import platform
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad import data as fad_data
from tff_fad import local_workers
from tff_fad import served_workers
from tff_fad import worker_tls
from tff_fad import workers
from tff_fad.learning import baffle
from tff_fad.learning import functional_models as fm
from tff_fad.learning import hypergradient_fed_avg
from tff_fad.learning import models

_CLIENTS = flags.DEFINE_list('clients_per_round', ['10', '100', '1000'],
                             'Clients per round.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 1000,
                                    'Clients in the IID digits split.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds per variant.')
_K = flags.DEFINE_integer('K', 100, 'BAFFLE perturbations.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Client batch size.')
_ALGORITHMS = flags.DEFINE_list(
    'algorithms', ['tff_fed_avg', 'hypergradient_fed_avg',
                   'hypergradient_fed_avg_all_batches', 'baffle'],
    'Algorithms to time, among those above and '
    'hypergradient_fed_avg_reverse, fed_avg_2_rounds_gradient, '
    'client_tensors_only, client_datasets_only.')
_OUTPUT = flags.DEFINE_string('output', 'benchmarks/results/scaling.json',
                              'Where to write JSON.')

_BASELINE = 'tff_fed_avg'
# (label, flag name, workers, each pinned to one core, behind TLS fronts);
# 'local' is TFF's default context.
_CONTEXTS = (('local', 'local', 0, False, False),
             ('1 worker', '1_worker', 1, False, False),
             ('2 workers', '2_workers', 2, False, False),
             ('1 worker, 1 core', '1_worker_pinned', 1, True, False),
             ('2 workers, 1 core each', '2_workers_pinned', 2, True, False),
             ('2 workers, 1 core each, TLS', '2_workers_pinned_tls', 2, True,
              True))
_CONTEXT_NAMES = flags.DEFINE_list(
    'contexts', [c[1] for c in _CONTEXTS],
    f'Execution contexts to time, among {[c[1] for c in _CONTEXTS]}; '
    "'local' is always timed (the ratios divide by it).")


def _tensor_data_type(model):
  """Each client's images as one tensor batch (see `_client_data`)."""
  num_features = int(np.prod(model.initial_weights[0][0].shape[:-1]))
  return tff.FederatedType(collections.OrderedDict(
      x=tff.TensorType(np.float32, [None, num_features]),
      y=tff.TensorType(np.int32, [None])), tff.CLIENTS)


def _count_clients(data_type):
  """A call that receives the client data and only counts the clients."""

  @tff.federated_computation(data_type)
  def count_clients(data):
    one = tff.tensorflow.computation(lambda _: tf.constant(1),
                                     data_type.member)
    return tff.federated_sum(tff.federated_map(one, data))

  return count_clients


def _two_rounds_gradient(model):
  """The gradient of the 2-round FedAvg loss w.r.t. the initial model.

  Client data as tensors (each client's images as one batch), so the whole
  program is differentiable; two local gradient steps at rate 0.05; server
  rate 1.
  """
  initial = tuple(np.asarray(w, np.float32) for w in model.initial_weights[0])
  w_type = tff.FederatedType(
      tuple(tff.TensorType(np.float32, w.shape) for w in initial), tff.SERVER)
  data_type = _tensor_data_type(model)

  def loss(w, batch):
    logits = batch['x'] @ w[0] + w[1]
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        batch['y'], logits))

  def local_delta(w, batch):
    local = w
    for _ in range(2):
      with tf.GradientTape() as tape:
        tape.watch(local)
        value = loss(local, batch)
      local = tf.nest.map_structure(lambda p, g: p - 0.05 * g, local,
                                    tape.gradient(value, local))
    return tf.nest.map_structure(tf.subtract, w, local)

  @tff_fad.federated_computation(w_type, data_type)
  def two_rounds_then_loss(w, data):
    for _ in range(2):
      deltas = tff_fad.federated_map(local_delta,
                                     (tff_fad.federated_broadcast(w), data))
      w = tff_fad.federated_apply(
          lambda w, d: tf.nest.map_structure(tf.subtract, w, d),
          (w, tff_fad.federated_mean(deltas)))
    return tff_fad.federated_mean(
        tff_fad.federated_map(loss, (tff_fad.federated_broadcast(w), data)))

  gradient = tff_fad.grad(two_rounds_then_loss, wrt='w',
                          mode='reverse_recompute')
  return lambda data: gradient(initial, data)


def _round_step(name: str, model):
  """`step(client data)`: one round (or one gradient) of algorithm `name`."""
  sgd = tff.learning.optimizers.build_sgdm(0.05)
  if name == 'fed_avg_2_rounds_gradient':
    return _two_rounds_gradient(model)
  if name == 'client_tensors_only':
    return _count_clients(_tensor_data_type(model))
  if name == 'client_datasets_only':
    return _count_clients(tff.FederatedType(fm.data_type(model), tff.CLIENTS))
  if name == 'tff_fed_avg':
    process = tff.learning.algorithms.build_weighted_fed_avg(
        model, client_optimizer_fn=sgd)
  elif name == 'hypergradient_fed_avg':  # The hypergradient of first batches.
    process = hypergradient_fed_avg.build_hypergradient_fed_avg(model, sgd)
  elif name == 'hypergradient_fed_avg_all_batches':
    process = hypergradient_fed_avg.build_hypergradient_fed_avg(
        model, sgd, post_update_loss='all_batches')
  elif name == 'hypergradient_fed_avg_reverse':
    process = hypergradient_fed_avg.build_hypergradient_fed_avg(
        model, sgd, mode='reverse')
  elif name == 'baffle':
    process = baffle.build_baffle(model, num_perturbations=_K.value)
  else:
    raise ValueError(f'--algorithms: unknown {name!r}.')
  state = process.initialize()
  return lambda data: process.next(state, data).metrics


def _client_data(fed, name: str, clients_per_round: int):
  ids = fed.client_ids[:clients_per_round]
  if name in ('fed_avg_2_rounds_gradient', 'client_tensors_only'):
    # Tensors: differentiable.
    data = []
    for i in ids:
      x, y = fm.batch_inputs(next(iter(
          fed.train.create_tf_dataset_for_client(i).batch(10_000))))
      data.append(collections.OrderedDict(
          x=np.reshape(x, [x.shape[0], -1]).astype(np.float32),
          y=np.asarray(y, np.int32)))
    return data
  datasets = [fed.train.create_tf_dataset_for_client(i).batch(_BATCH.value)
              for i in ids]
  if name == 'baffle':  # BAFFLE's fedsgd mode reads one batch per client.
    datasets = [ds.take(1) for ds in datasets]
  return datasets


def _pin(pid: int, core: int) -> None:
  """Pins every thread of `pid` (threads it starts later inherit it)."""
  for task in os.listdir(f'/proc/{pid}/task'):
    os.sched_setaffinity(int(task), {core})


def _time_round(step, data) -> float:
  start = time.perf_counter()
  tf.nest.map_structure(np.asarray, step(data))  # Materialized.
  return time.perf_counter() - start


def measure(fed, model, contexts, names, clients_per_round: int,
            repeats: int, rng) -> dict:
  """Median round seconds of each algorithm in each context.

  Every (algorithm, context) pair is warmed up, then the pairs are timed in
  a fresh random order per repeat, so the algorithms' ratios are measured
  side by side.
  """
  runs = {}
  for name in names:
    runs[name] = (_round_step(name, model),
                  _client_data(fed, name, clients_per_round))
  pairs = [(name, label) for name in names for label in contexts]
  for name, label in pairs:  # Warm-up.
    with contexts[label]():
      _time_round(*runs[name])
  times = collections.defaultdict(list)
  for _ in range(repeats):
    for i in rng.permutation(len(pairs)):
      name, label = pairs[i]
      with contexts[label]():
        times[name, label].append(_time_round(*runs[name]))
  return {name: {label: statistics.median(times[name, label])
                 for label in contexts} for name in names}


def _ratio(seconds, numerator, denominator):
  if numerator in seconds and denominator in seconds:
    return seconds[numerator] / seconds[denominator]
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tff_fad.runtime.set_up_entry_point()  # No signal leaks TFF's worker.
  fed = fad_data.load_federated_digits(num_clients=_NUM_CLIENTS.value,
                                       dirichlet_alpha=None, seed=0)
  net = models.get_net('linear', fed.image_shape)
  model = models.to_functional_model(net, fed.image_shape, seed=0)
  rng = np.random.default_rng(0)
  rows = []
  cores = sorted(os.sched_getaffinity(0))
  with contextlib.ExitStack() as started:
    stack = tff.framework.get_context_stack()
    contexts = collections.OrderedDict(local=contextlib.nullcontext)
    unknown = set(_CONTEXT_NAMES.value) - {c[1] for c in _CONTEXTS}
    if unknown:
      raise app.UsageError(f'--contexts: unknown {sorted(unknown)}; choose '
                           f'among {[c[1] for c in _CONTEXTS]}.')
    for label, flag_name, num_workers, pinned, tls in _CONTEXTS[1:]:
      if flag_name not in _CONTEXT_NAMES.value:
        continue
      if tls:
        # What a cluster runs (`local_workers serve`), on loopback: each
        # worker behind a mutual-TLS front, pinned with it to its core.
        pki = worker_tls.make_certificates(
            started.enter_context(tempfile.TemporaryDirectory()),
            ['127.0.0.1'])
        served = started.enter_context(served_workers.ServedWorkers(
            num_workers, tls_ca=pki['ca_cert'], tls_cert=pki['worker_cert'],
            tls_key=pki['worker_key']))
        addresses, pids = served.addresses, list(zip(served.worker_pids,
                                                     served.pids))
        driver_tls = workers.WorkerTls(pki['ca_cert'], pki['driver_cert'],
                                       pki['driver_key'])
      else:
        local = started.enter_context(local_workers.LocalWorkers(num_workers))
        addresses, pids = local.addresses, [(p,) for p in local.pids]
        driver_tls = None
      if pinned:
        for i, pids_of_worker in enumerate(pids):
          for pid in pids_of_worker:
            _pin(pid, cores[i % len(cores)])
      # Created once, as a training run does: the context caches its
      # compilations to mergeable form across rounds.
      context = workers.create_worker_context(addresses, tls=driver_tls)
      contexts[label] = functools.partial(stack.install, context)
    for clients in [int(c) for c in _CLIENTS.value]:
      # The baseline first, so every row has its ratio.
      names = sorted(_ALGORITHMS.value, key=lambda n: n != _BASELINE)
      measured = measure(fed, model, contexts, names, clients,
                         _REPEATS.value, rng)
      baseline = measured.get(_BASELINE, {}).get('local')
      for name in names:
        seconds = measured[name]
        row = collections.OrderedDict(
            clients_per_round=clients, algorithm=name,
            seconds=seconds,
            over_tff_fed_avg_local=(
                {k: v / baseline for k, v in seconds.items()}
                if baseline else None),
            speedup_2_over_1_worker=_ratio(seconds, '1 worker', '2 workers'),
            speedup_2_over_1_pinned_worker=_ratio(
                seconds, '1 worker, 1 core', '2 workers, 1 core each'),
            tls_over_plaintext_2_pinned_workers=_ratio(
                seconds, '2 workers, 1 core each, TLS',
                '2 workers, 1 core each'))
        rows.append(row)
        print(f'{clients:>5} clients  {name:<34} ' + '  '.join(
            f'{k} {v:7.3f} s' for k, v in seconds.items()) + (
                f'  (x{seconds["local"] / baseline:.2f} TFF FedAvg local)'
                if baseline else ''), flush=True)
  result = dict(
      model=f'linear ({net.num_params:,} parameters)',
      num_clients=_NUM_CLIENTS.value, batch_size=_BATCH.value, K=_K.value,
      repeats=_REPEATS.value, contexts=list(contexts),
      machine=dict(cpus=os.cpu_count(), python=platform.python_version()),
      rows=rows)
  os.makedirs(os.path.dirname(_OUTPUT.value) or '.', exist_ok=True)
  with open(_OUTPUT.value, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  try:
    app.run(main)
  finally:
    tff_fad.runtime.shutdown_local_workers()
