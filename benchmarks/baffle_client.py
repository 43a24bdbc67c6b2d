r"""BAFFLE's client cost against backprop and plain inference, side by side.

For LeNet (26,730 parameters) and WRN-10-2 (or `--models=linear
--image_shape=28,28,1`, the experiments' model) on one batch of
`--batch_size` random images with random labels (the values do not change
the cost):

Time (all variants in this process, compiled once and warmed up, then
interleaved in a random order per repeat; a figure is the median of
`--repeats` timed calls, each ending with `.numpy()` so the work is done):
  * `baffle`: the per-client computation of `build_client_work(...,
    mode='fedsgd', estimator='forward')` with K=`--K`. Its body is
    `baffle.estimate_scores(baffle.batch_loss_fn(model, (), batch), ...)`
    on the first batch; here that same call is wrapped in a `tf.function`
    and fed the batch as a tensor, so no TFF executor or `tf.data` overhead
    is counted (reproduced, not the TFF computation object itself).
  * `baffle_tff`: the `tff.Computation` returned by `build_client_work`,
    called directly on a one-batch list (adds TFF's execution overhead).
  * `backprop`: the loss and its gradient by `tf.GradientTape` (one SGD step's
    work, without applying it), in one `tf.function`.
  * `forward_x(K+1)`: K+1 calls of a compiled single forward pass (loss), the
    number of forward passes the forward estimator makes.
  * `baffle_P<P>` for each P in `--parallel_perturbations`: `baffle` with
    `parallel_perturbations=P`, P perturbed models per batched forward pass
    (`baffle_P1` is `baffle`).
  * `baffle_central`, `baffle_jvp`: the same with the other estimators.
  * `inference_large`: one forward pass on `--peak_batch_size` examples, the
    most FLOP/s this process gets from the model's forward pass.
  * `round_P<P>`: one in-training round, `build_baffle(...).next` on
    `--round_clients` clients of the embedded digits (one batch each, drawn
    as `research/baffle/main.py` draws them: shuffled `tf.data` datasets),
    divided by the number of clients; for P=1 and the largest P.

FLOP efficiency: a client step's achieved FLOP/s (the model's forward
FLOPs on the batch, x the passes `baffle.forward_passes_per_step` counts,
over the step's time) divided by `inference_large`'s FLOP/s. FLOPs are 2 x
the multiply-adds of the graph's convolutions and matrix products (read
from the traced graph's shapes; elementwise ops, under 1% for these
models, are not counted). So 1.0 means the step runs its passes as fast as
this machine runs the model at all; `jvp` passes count twice.

Peak memory (CPU: `tf.config.experimental.get_memory_info` does not apply):
each variant runs in a fresh subprocess that imports TF/TFF, builds the model
and the batch, traces the variant's `tf.function` (graph building, not
run), resets the process's peak-RSS mark (`/proc/self/clear_refs`
<- 5; importing TFF peaks higher than a LeNet step), then runs the variant
`--memory_calls` times and reports its peak RSS (`VmHWM` of
/proc/self/status; `ru_maxrss` would include the parent's peak, which exec
carries over); a baseline subprocess does
everything except running a variant. Reported: the variant's peak RSS minus
the baseline's (`peak_rss_delta_mb`, first calls), for `inference` (one
forward pass), `baffle` (K=`--K`, the forward estimator), `baffle_central`,
`baffle_jvp`, `backprop` and `baffle_P<P>`. RSS deltas include TF's graph
building and kernel caches, so small differences (a few MB) are noise.

  python -m benchmarks.baffle_client
writes benchmarks/results/baffle_client.json and prints a table.
"""

import collections
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import tff_fad
from tff_fad.learning import baffle
from tff_fad.learning import models

_MODELS = flags.DEFINE_list('models', ['lenet', 'wrn'], 'Models to measure.')
_K = flags.DEFINE_integer('K', 100, 'Perturbations of the BAFFLE client.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Client batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per variant.')
_MEMORY_CALLS = flags.DEFINE_integer(
    'memory_calls', 2, 'Calls of the variant in each memory subprocess.')
_OUTPUT = flags.DEFINE_string(
    'output', 'benchmarks/results/baffle_client.json', 'Where to write JSON.')
_IMAGE = flags.DEFINE_list('image_shape', ['32', '32', '1'],
                           'Input shape (LeNet and WRN need 32x32; the '
                           'experiments run the linear model on 28x28).')
_PARALLEL = flags.DEFINE_list(
    'parallel_perturbations', ['1', '4', '10', '25'],
    'Values of P (perturbed models per batched forward pass) to measure.')
_PEAK_BATCH = flags.DEFINE_integer(
    'peak_batch_size', 1024, 'Batch of the forward pass whose FLOP/s is the '
    'reference of the FLOP efficiency.')
_ROUND_CLIENTS = flags.DEFINE_integer(
    'round_clients', 10, 'Clients of the timed in-training round (0: skip).')
_BASE_MEMORY_VARIANTS = ('inference', 'baffle', 'baffle_central',
                         'baffle_jvp', 'backprop')
_MEMORY_VARIANT = flags.DEFINE_string(
    'memory_variant', None,
    'Internal: run one variant (baseline, inference, baffle, ..., '
    'baffle_P<P>) and print its peak RSS (used by subprocesses).')
_MODEL = flags.DEFINE_string('model', 'lenet', 'Internal: model of '
                             '--memory_variant.')

SIGMA = 1e-4
SEED = 0


def _image_shape():
  return tuple(int(d) for d in _IMAGE.value)


def _parallel_values() -> list[int]:
  values = sorted({int(p) for p in _PARALLEL.value} | {1})
  if values[0] < 1:
    raise app.UsageError('--parallel_perturbations must be >= 1.')
  return values


def _memory_variants() -> tuple[str, ...]:
  return _BASE_MEMORY_VARIANTS + tuple(
      f'baffle_P{p}' for p in _parallel_values() if p > 1)


_Setup = collections.namedtuple(
    '_Setup', 'net model weights batch seed variants tracers forward')


def _random_batch(batch_size: int, rng: np.random.Generator):
  return collections.OrderedDict(
      x=tf.constant(rng.random((batch_size, *_image_shape()), np.float32)),
      y=tf.constant(rng.integers(0, 10, batch_size).astype(np.int32)))


def _graph_flops(graph) -> int:
  """2 x the multiply-adds of the convolutions and matrix products in
  `graph` and the functions it calls (shapes must be static)."""
  total = 0
  for op in graph.get_operations():
    if op.type in ('PartitionedCall', 'StatefulPartitionedCall'):
      # pylint: disable-next=protected-access
      total += _graph_flops(graph._get_function(op.get_attr('f').name).graph)
    elif op.type == 'Conv2D':
      height, width, channels_in, _ = op.inputs[1].shape
      total += (2 * op.outputs[0].shape.num_elements() * height * width *
                channels_in)
    elif op.type == 'MatMul':
      rows_a, cols_a = op.inputs[0].shape
      inner = rows_a if op.get_attr('transpose_a') else cols_a
      total += 2 * op.outputs[0].shape.num_elements() * inner
    elif op.type in ('Conv3D', 'DepthwiseConv2dNative', 'BatchMatMulV2',
                     'Einsum', 'While', 'StatelessWhile'):
      raise NotImplementedError(
          f'_graph_flops does not count {op.type} ({op.name}); a count '
          'without it would be wrong.')
  return total


def _setup(model_name: str, batch_size: int,
           num_perturbations: int) -> _Setup:
  """The model, weights, one batch, seed, and each variant's callable and
  graph builder."""
  image_shape = _image_shape()
  net = models.get_net(model_name, image_shape)
  model = models.to_functional_model(net, image_shape, seed=SEED)
  weights = [tf.constant(w) for w in model.initial_weights[0]]
  rng = np.random.default_rng(SEED)
  batch = _random_batch(batch_size, rng)
  seed = tf.constant([SEED, 1], tf.int64)

  def loss(trainable, b):
    return baffle.batch_loss_fn(model, (), b)(trainable)

  @tf.function
  def forward(trainable, b):
    return loss(trainable, b)

  def scores_fn(estimator, parallel=1):
    @tf.function
    def scores(trainable, b, s):
      # build_client_work's 'fedsgd' scores (without its metrics update).
      return baffle.estimate_scores(
          baffle.batch_loss_fn(model, (), b), list(trainable), s,
          num_perturbations, SIGMA, estimator, parallel,
          stacked_loss_fn=baffle.stacked_batch_loss_fn(model, (), b))
    return scores

  estimators = {name: scores_fn(name) for name in baffle.ESTIMATORS}
  baffle_scores = estimators['forward']
  stacked = {p: scores_fn('forward', p) for p in _parallel_values() if p > 1}

  @tf.function
  def backprop(trainable, b):
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      value = loss(trainable, b)
    return value, tape.gradient(value, trainable)

  def run_forward():
    return forward(weights, batch).numpy()

  def run_forwards():
    for _ in range(num_perturbations + 1):
      value = forward(weights, batch)
    return value.numpy()

  def run_baffle():
    return baffle_scores(weights, batch, seed)[0].numpy()

  def run_backprop():
    return [g.numpy() for g in backprop(weights, batch)[1]]

  variants = collections.OrderedDict(
      inference=run_forward, baffle=run_baffle, backprop=run_backprop,
      forwards=run_forwards,
      baffle_central=lambda: estimators['central'](
          weights, batch, seed)[0].numpy(),
      baffle_jvp=lambda: estimators['jvp'](weights, batch, seed)[0].numpy())
  for p, fn in stacked.items():
    variants[f'baffle_P{p}'] = (
        lambda fn=fn: fn(weights, batch, seed)[0].numpy())
  # Builds each variant's graph without running it.
  tracers = collections.OrderedDict(
      inference=lambda: forward.get_concrete_function(weights, batch),
      baffle=lambda: baffle_scores.get_concrete_function(weights, batch, seed),
      baffle_central=lambda: estimators['central'].get_concrete_function(
          weights, batch, seed),
      baffle_jvp=lambda: estimators['jvp'].get_concrete_function(
          weights, batch, seed),
      backprop=lambda: backprop.get_concrete_function(weights, batch))
  for p, fn in stacked.items():
    tracers[f'baffle_P{p}'] = (
        lambda fn=fn: fn.get_concrete_function(weights, batch, seed))
  return _Setup(net, model, weights, batch, seed, variants, tracers, forward)


def _status_kb(field: str) -> int:
  """A `/proc/self/status` field in kB (VmHWM: peak RSS)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  # No procfs: ru_maxrss (which may include the parent's peak) for both.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
  # Importing TF/TFF peaks above what a small model's step needs; reset the
  # high-water mark (Linux >= 4.0) so the peak is that of what runs next.
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass  # Then every variant shares the import-time peak.


def _memory_child() -> None:
  """Runs --memory_variant in this (fresh) process and prints peak RSS."""
  setup = _setup(_MODEL.value, _BATCH.value, _K.value)
  variants, tracers = setup.variants, setup.tracers
  variant = _MEMORY_VARIANT.value
  if variant != 'baseline':
    if variant not in tracers:
      raise app.UsageError(f'Unknown --memory_variant={variant}.')
    tracers[variant]()
  _reset_peak()
  if variant != 'baseline':
    for _ in range(_MEMORY_CALLS.value):
      variants[variant]()
  # VmHWM is this address space's peak (kB); ru_maxrss would also count the
  # parent's peak, which exec carries over into the child's rusage.
  print(f'PEAK_RSS_KB {_status_kb("VmHWM")}')


def _peak_rss_kb(model_name: str, variant: str) -> int:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.baffle_client',
       f'--memory_variant={variant}', f'--model={model_name}',
       f'--K={_K.value}', f'--batch_size={_BATCH.value}',
       f'--memory_calls={_MEMORY_CALLS.value}',
       f'--parallel_perturbations={",".join(_PARALLEL.value)}',
       f'--image_shape={",".join(_IMAGE.value)}'],
      capture_output=True, text=True, check=True, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for line in out.stdout.splitlines():
    if line.startswith('PEAK_RSS_KB'):
      return int(line.split()[1])
  raise RuntimeError(f'no PEAK_RSS_KB in output: {out.stdout}\n{out.stderr}')


def _round_fns(model, parallel_values) -> dict:
  """`round_P<P>`: one in-training round of `--round_clients` clients."""
  if not _ROUND_CLIENTS.value or _image_shape() != (32, 32, 1):
    return {}
  from tff_fad.data import digits  # pylint: disable=g-import-not-at-top
  num_clients = _ROUND_CLIENTS.value
  fed = digits.load_federated_digits(num_clients=num_clients, seed=SEED,
                                     pad_to_32x32=True)

  def select(round_num):
    # research.experiment.client_selector's datasets for --batch_size with
    # one batch per client (not imported: its flags clash with these).
    return [fed.train.create_tf_dataset_for_client(c).shuffle(
        1000, seed=int(np.random.default_rng([SEED, round_num, i]).integers(
            2**62))).batch(_BATCH.value).take(1)
            for i, c in enumerate(fed.client_ids)]

  fns = collections.OrderedDict()
  for p in sorted({parallel_values[0], parallel_values[-1]}):
    process = baffle.build_baffle(model, num_perturbations=_K.value,
                                  sigma=SIGMA, parallel_perturbations=p,
                                  seed=SEED)
    state = process.initialize()
    rounds = iter(range(1, 1_000_000))

    def one_round(process=process, state=state, rounds=rounds):
      # A new round's clients and data each call, as in training.
      output = process.next(state, select(next(rounds)))
      return output.metrics['client_work']['train']['loss']

    fns[f'round_P{p}'] = one_round
  return fns


def _time_model(model_name: str) -> dict:
  setup = _setup(model_name, _BATCH.value, _K.value)
  model, weights, batch, seed, variants = (
      setup.model, setup.weights, setup.batch, setup.seed, setup.variants)
  large_batch = _random_batch(_PEAK_BATCH.value, np.random.default_rng(SEED))
  flops = dict(
      batch=_graph_flops(
          setup.forward.get_concrete_function(weights, batch).graph),
      large_batch=_graph_flops(
          setup.forward.get_concrete_function(weights, large_batch).graph))
  client_work = baffle.build_client_work(
      model, num_perturbations=_K.value, sigma=SIGMA, estimator='forward',
      mode='fedsgd')
  weights_value = collections.OrderedDict(
      trainable=tuple(w.numpy() for w in weights), non_trainable=())
  batch_np = collections.OrderedDict((k, v.numpy()) for k, v in batch.items())
  seed_np = seed.numpy()

  parallel_values = _parallel_values()
  timed = collections.OrderedDict(
      baffle=variants['baffle'],
      baffle_tff=lambda: client_work(weights_value, seed_np, [batch_np]),
      backprop=variants['backprop'],
      forwards=variants['forwards'],
      baffle_central=variants['baffle_central'],
      baffle_jvp=variants['baffle_jvp'],
      inference_large=lambda: setup.forward(weights, large_batch).numpy())
  for p in parallel_values[1:]:
    timed[f'baffle_P{p}'] = variants[f'baffle_P{p}']
  rounds = _round_fns(model, parallel_values)
  timed.update(rounds)
  # The TFF computation and the reproduced body compute the same scores, up
  # to float32 rounding of the loss divided by sigma (1 ulp / 1e-4 ~ 2e-3);
  # so do the batched ones.
  reference = variants['baffle']()
  np.testing.assert_allclose(
      timed['baffle_tff']()['update'], reference, atol=2e-2)
  for p in parallel_values[1:]:
    np.testing.assert_allclose(timed[f'baffle_P{p}'](), reference, atol=2e-2)
  for fn in timed.values():  # Warm-up: tracing and first-call costs.
    fn()
  times = collections.defaultdict(list)
  order = list(timed)
  for _ in range(_REPEATS.value):
    random.shuffle(order)
    for name in order:
      start = time.perf_counter()
      timed[name]()
      times[name].append(time.perf_counter() - start)
  seconds = {k: statistics.median(v) for k, v in times.items()}
  for name in rounds:
    seconds[name] /= _ROUND_CLIENTS.value  # Per client.
  peak = flops['large_batch'] / seconds['inference_large']
  efficiency = collections.OrderedDict()
  for estimator in baffle.ESTIMATORS:
    name = 'baffle' if estimator == 'forward' else f'baffle_{estimator}'
    passes = baffle.forward_passes_per_step(estimator, _K.value)
    achieved = flops['batch'] * passes / seconds[name]
    efficiency[estimator] = collections.OrderedDict(
        forward_passes=passes, achieved_flops_per_second=achieved,
        over_peak=achieved / peak)
  return dict(num_params=setup.net.num_params, seconds=seconds,
              forward_flops=flops, peak_flops_per_second=peak,
              flop_efficiency=efficiency)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tff_fad.runtime.set_up_entry_point()  # No signal leaks TFF's worker.
  if _MEMORY_VARIANT.value:
    _memory_child()
    return
  random.seed(SEED)
  k = _K.value
  memory_variants = _memory_variants()
  results = []
  try:
    for model_name in _MODELS.value:
      timing = _time_model(model_name)
      rss = {v: _peak_rss_kb(model_name, v)
             for v in ('baseline',) + memory_variants}
      delta_mb = {v: (rss[v] - rss['baseline']) / 1024.0
                  for v in memory_variants}
      s = timing['seconds']
      by_p = collections.OrderedDict()
      for p in _parallel_values():
        name = 'baffle' if p == 1 else f'baffle_P{p}'
        by_p[str(p)] = collections.OrderedDict(
            seconds=s[name],
            over_backprop=s[name] / s['backprop'],
            over_forwards=s[name] / s['forwards'],
            round_seconds_per_client=s.get(f'round_P{p}'),
            round_per_client_over_step=(
                s[f'round_P{p}'] / s[name] if f'round_P{p}' in s else None),
            peak_rss_delta_mb=delta_mb[name],
            over_inference=_ratio_or_none(delta_mb[name],
                                          delta_mb['inference']))
      results.append(collections.OrderedDict(
          model=model_name, image_shape=list(_image_shape()),
          num_params=timing['num_params'],
          batch_size=_BATCH.value, K=k, repeats=_REPEATS.value,
          round_clients=_ROUND_CLIENTS.value,
          seconds=s,
          forward_flops=timing['forward_flops'],
          peak_batch_size=_PEAK_BATCH.value,
          peak_flops_per_second=timing['peak_flops_per_second'],
          flop_efficiency=timing['flop_efficiency'],
          time_ratios=collections.OrderedDict(
              baffle_over_backprop=s['baffle'] / s['backprop'],
              baffle_over_forwards=s['baffle'] / s['forwards'],
              baffle_tff_over_baffle=s['baffle_tff'] / s['baffle']),
          peak_rss_kb=rss,
          peak_rss_delta_mb=delta_mb,
          memory_ratios=collections.OrderedDict(
              baffle_over_backprop=_ratio_or_none(delta_mb['baffle'],
                                                  delta_mb['backprop']),
              baffle_over_inference=_ratio_or_none(delta_mb['baffle'],
                                                   delta_mb['inference'])),
          by_parallel_perturbations=by_p))
  finally:
    tff_fad.runtime.shutdown_local_workers()

  def ratio(x):
    return '-' if x is None else f'{x:.2f}'

  lines = [
      f'BAFFLE client (forward estimator, K={k}) vs backprop, batch '
      f'{_BATCH.value}, {"x".join(_IMAGE.value)}; time = median of '
      f'{_REPEATS.value} calls',
      '| model | params | BAFFLE (s) | BAFFLE via TFF (s) | backprop (s) | '
      f'{k + 1} forwards (s) | BAFFLE/backprop | BAFFLE/{k + 1} fwd |',
      '|---|---|---|---|---|---|---|---|']
  for r in results:
    s = r['seconds']
    lines.append(
        f"| {r['model']} | {r['num_params']:,} | {s['baffle']:.4f} | "
        f"{s['baffle_tff']:.4f} | {s['backprop']:.4f} | {s['forwards']:.4f} | "
        f"{ratio(r['time_ratios']['baffle_over_backprop'])} | "
        f"{ratio(r['time_ratios']['baffle_over_forwards'])} |")
  lines += [
      '', f'FLOP efficiency, K={k}: achieved FLOP/s of the step (forward '
      f'FLOPs x passes / time) over a batch-{_PEAK_BATCH.value} forward '
      'pass\'s',
      '| model | forward GFLOP (batch) | peak GFLOP/s | forward | central | '
      'jvp (passes x2) |',
      '|---|---|---|---|---|---|']
  for r in results:
    e = r['flop_efficiency']
    lines.append(
        f"| {r['model']} | {r['forward_flops']['batch'] / 1e9:.3f} | "
        f"{r['peak_flops_per_second'] / 1e9:.1f} | "
        f"{e['forward']['over_peak']:.2f} | {e['central']['over_peak']:.2f} | "
        f"{e['jvp']['over_peak']:.2f} |")
  lines += [
      '', f'Peak RSS above the baseline process (MB), K={k}',
      '| model | inference | BAFFLE forward | BAFFLE central | BAFFLE jvp | '
      'backprop | BAFFLE/backprop | BAFFLE/inference |',
      '|---|---|---|---|---|---|---|---|']
  for r in results:
    d = r['peak_rss_delta_mb']
    lines.append(
        f"| {r['model']} | {d['inference']:.1f} | {d['baffle']:.1f} | "
        f"{d['baffle_central']:.1f} | {d['baffle_jvp']:.1f} | "
        f"{d['backprop']:.1f} | "
        f"{ratio(r['memory_ratios']['baffle_over_backprop'])} | "
        f"{ratio(r['memory_ratios']['baffle_over_inference'])} |")
  lines += [
      '', f'P perturbed models per batched forward pass, K={k} (memory: '
      'peak RSS above the baseline process)',
      '| model | P | step (s) | / backprop | / ' + f'{k + 1} fwd | '
      'round per client (s) | round / step | peak MB | / inference |',
      '|---|---|---|---|---|---|---|---|---|']
  for r in results:
    for p, row in r['by_parallel_perturbations'].items():
      round_s = row['round_seconds_per_client']
      lines.append(
          f"| {r['model']} | {p} | {row['seconds']:.4f} | "
          f"{row['over_backprop']:.1f} | {row['over_forwards']:.2f} | "
          f"{'-' if round_s is None else f'{round_s:.4f}'} | "
          f"{ratio(row['round_per_client_over_step'])} | "
          f"{row['peak_rss_delta_mb']:.1f} | "
          f"{ratio(row['over_inference'])} |")
  print('\n'.join(lines))
  os.makedirs(os.path.dirname(_OUTPUT.value) or '.', exist_ok=True)
  with open(_OUTPUT.value, 'w') as f:
    json.dump(dict(K=k, batch_size=_BATCH.value, repeats=_REPEATS.value,
                   memory_calls=_MEMORY_CALLS.value,
                   parallel_perturbations=_parallel_values(),
                   machine=collections.OrderedDict(
                       cpus=os.cpu_count(),
                       load_average_1min_at_end=os.getloadavg()[0]),
                   results=results),
              f, indent=2)
  print(f'wrote {_OUTPUT.value}')


def _ratio_or_none(a: float, b: float):
  return a / b if b > 0 else None


if __name__ == '__main__':
  app.run(main)
