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
  * TFF's own `tff.learning.algorithms.build_weighted_fed_avg`, the baseline;

with 10, 100 and 1,000 clients per round, in five execution contexts:

  * `local`: TFF's default context (the C++ runtime in one worker process
    TFF starts itself);
  * `1 worker` / `2 workers`: a `tff_fad.workers` context over local
    `worker_binary` services started by `tff_fad.local_workers.LocalWorkers`,
    each round's clients split between them by TFF's mergeable context;
  * the same with each worker pinned to one core (`sched_setaffinity`): one
    worker's TensorFlow thread pools already use every core of this machine,
    so only pinned workers show what splitting a round buys when each worker
    has a machine (here, a core) of its own.

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
"""

import collections
import contextlib
import functools
import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad import data as fad_data
from tff_fad import local_workers
from tff_fad import workers
from tff_fad.learning import baffle
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
    'Algorithms to time.')
_OUTPUT = flags.DEFINE_string('output', 'benchmarks/results/scaling.json',
                              'Where to write JSON.')

_BASELINE = 'tff_fed_avg'
# (label, workers, each pinned to one core); 'local' is TFF's default context.
_CONTEXTS = (('local', 0, False), ('1 worker', 1, False),
             ('2 workers', 2, False), ('1 worker, 1 core', 1, True),
             ('2 workers, 1 core each', 2, True))
_CONTEXT_NAMES = flags.DEFINE_list(
    'contexts', [c[0] for c in _CONTEXTS],
    f'Execution contexts to time, among {[c[0] for c in _CONTEXTS]}; '
    "'local' is always timed (the ratios divide by it).")


def _process(name: str, model):
  sgd = tff.learning.optimizers.build_sgdm(0.05)
  if name == 'tff_fed_avg':
    return tff.learning.algorithms.build_weighted_fed_avg(
        model, client_optimizer_fn=sgd)
  if name == 'hypergradient_fed_avg':  # The hypergradient of first batches.
    return hypergradient_fed_avg.build_hypergradient_fed_avg(model, sgd)
  if name == 'hypergradient_fed_avg_all_batches':
    return hypergradient_fed_avg.build_hypergradient_fed_avg(
        model, sgd, post_update_loss='all_batches')
  if name == 'baffle':
    return baffle.build_baffle(model, num_perturbations=_K.value)
  raise ValueError(f'--algorithms: unknown {name!r}.')


def _client_data(fed, name: str, clients_per_round: int):
  ids = fed.client_ids[:clients_per_round]
  datasets = [fed.train.create_tf_dataset_for_client(i).batch(_BATCH.value)
              for i in ids]
  if name == 'baffle':  # BAFFLE's fedsgd mode reads one batch per client.
    datasets = [ds.take(1) for ds in datasets]
  return datasets


def _pin(pid: int, core: int) -> None:
  """Pins every thread of `pid` (threads it starts later inherit it)."""
  for task in os.listdir(f'/proc/{pid}/task'):
    os.sched_setaffinity(int(task), {core})


def _time_round(process, state, data) -> float:
  start = time.perf_counter()
  output = process.next(state, data)
  tf.nest.map_structure(np.asarray, output.metrics)  # Materialized.
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
    process = _process(name, model)
    runs[name] = (process, process.initialize(),
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
    unknown = set(_CONTEXT_NAMES.value) - {c[0] for c in _CONTEXTS}
    if unknown:
      raise app.UsageError(f'--contexts: unknown {sorted(unknown)}; choose '
                           f'among {[c[0] for c in _CONTEXTS]}.')
    for label, num_workers, pinned in _CONTEXTS[1:]:
      if label not in _CONTEXT_NAMES.value:
        continue
      local = started.enter_context(local_workers.LocalWorkers(num_workers))
      if pinned:
        for i, pid in enumerate(local.pids):
          _pin(pid, cores[i % len(cores)])
      # Created once, as a training run does: the context caches its
      # compilations to mergeable form across rounds.
      context = workers.create_worker_context(local.addresses)
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
                seconds, '1 worker, 1 core', '2 workers, 1 core each'))
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
