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

Peak memory (CPU: `tf.config.experimental.get_memory_info` does not apply):
each variant runs in a fresh subprocess that imports TF/TFF, builds the model
and the batch, traces the variant's `tf.function` (graph building, not
run), resets the process's peak-RSS mark (`/proc/self/clear_refs`
<- 5; importing TFF peaks higher than a LeNet step), then runs the variant
`--memory_calls` times and reports its peak RSS (`VmHWM` of
/proc/self/status; `ru_maxrss` would include the parent's peak, which exec
carries over); a baseline subprocess does
everything except running a variant. Reported: the variant's peak RSS minus
the baseline's, for `inference` (one forward pass), `baffle` (K=`--K`, the
forward estimator), `baffle_central`, `baffle_jvp` and `backprop`. RSS
deltas include TF's graph building and kernel caches, so small differences
(a few MB) are noise.

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
_MEMORY_VARIANTS = ('inference', 'baffle', 'baffle_central', 'baffle_jvp',
                    'backprop')
_MEMORY_VARIANT = flags.DEFINE_enum(
    'memory_variant', None, ('baseline',) + _MEMORY_VARIANTS,
    'Internal: run one variant and print its peak RSS (used by subprocesses).')
_MODEL = flags.DEFINE_string('model', 'lenet', 'Internal: model of '
                             '--memory_variant.')

SIGMA = 1e-4
SEED = 0


def _image_shape():
  return tuple(int(d) for d in _IMAGE.value)


def _setup(model_name: str, batch_size: int, num_perturbations: int):
  """Returns (functional model, weights, batch, dict of variant callables)."""
  image_shape = _image_shape()
  net = models.get_net(model_name, image_shape)
  model = models.to_functional_model(net, image_shape, seed=SEED)
  weights = [tf.constant(w) for w in model.initial_weights[0]]
  rng = np.random.default_rng(SEED)
  batch = collections.OrderedDict(
      x=tf.constant(rng.random((batch_size, *image_shape), np.float32)),
      y=tf.constant(rng.integers(0, 10, batch_size).astype(np.int32)))
  seed = tf.constant([SEED, 1], tf.int64)

  def loss(trainable, b):
    return baffle.batch_loss_fn(model, (), b)(trainable)

  @tf.function
  def forward(trainable, b):
    return loss(trainable, b)

  def scores_fn(estimator):
    @tf.function
    def scores(trainable, b, s):
      # build_client_work's 'fedsgd' scores (without its metrics update).
      return baffle.estimate_scores(
          baffle.batch_loss_fn(model, (), b), list(trainable), s,
          num_perturbations, SIGMA, estimator, 1)
    return scores

  estimators = {name: scores_fn(name) for name in baffle.ESTIMATORS}
  baffle_scores = estimators['forward']

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
  # Builds each variant's graph without running it.
  tracers = collections.OrderedDict(
      inference=lambda: forward.get_concrete_function(weights, batch),
      baffle=lambda: baffle_scores.get_concrete_function(weights, batch, seed),
      baffle_central=lambda: estimators['central'].get_concrete_function(
          weights, batch, seed),
      baffle_jvp=lambda: estimators['jvp'].get_concrete_function(
          weights, batch, seed),
      backprop=lambda: backprop.get_concrete_function(weights, batch))
  return net, model, weights, batch, seed, variants, tracers


def _memory_child() -> None:
  """Runs --memory_variant in this (fresh) process and prints peak RSS."""
  _, _, _, _, _, variants, tracers = _setup(_MODEL.value, _BATCH.value,
                                            _K.value)
  if _MEMORY_VARIANT.value != 'baseline':
    tracers[_MEMORY_VARIANT.value]()
  # Importing TF/TFF peaks above what a small model's step needs; reset the
  # high-water mark (Linux >= 4.0) so the peak is that of what runs next.
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass  # Then every variant shares the import-time peak.
  if _MEMORY_VARIANT.value != 'baseline':
    for _ in range(_MEMORY_CALLS.value):
      variants[_MEMORY_VARIANT.value]()
  # VmHWM is this address space's peak (kB); ru_maxrss would also count the
  # parent's peak, which exec carries over into the child's rusage.
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        peak_kb = int(line.split()[1])
  print(f'PEAK_RSS_KB {peak_kb}')


def _peak_rss_kb(model_name: str, variant: str) -> int:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.baffle_client',
       f'--memory_variant={variant}', f'--model={model_name}',
       f'--K={_K.value}', f'--batch_size={_BATCH.value}',
       f'--memory_calls={_MEMORY_CALLS.value}',
       f'--image_shape={",".join(_IMAGE.value)}'],
      capture_output=True, text=True, check=True, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for line in out.stdout.splitlines():
    if line.startswith('PEAK_RSS_KB'):
      return int(line.split()[1])
  raise RuntimeError(f'no PEAK_RSS_KB in output: {out.stdout}\n{out.stderr}')


def _time_model(model_name: str) -> dict:
  net, model, weights, batch, seed, variants, _ = _setup(
      model_name, _BATCH.value, _K.value)
  client_work = baffle.build_client_work(
      model, num_perturbations=_K.value, sigma=SIGMA, estimator='forward',
      mode='fedsgd')
  weights_value = collections.OrderedDict(
      trainable=tuple(w.numpy() for w in weights), non_trainable=())
  batch_np = collections.OrderedDict((k, v.numpy()) for k, v in batch.items())
  seed_np = seed.numpy()

  timed = collections.OrderedDict(
      baffle=variants['baffle'],
      baffle_tff=lambda: client_work(weights_value, seed_np, [batch_np]),
      backprop=variants['backprop'],
      forwards=variants['forwards'])
  # The TFF computation and the reproduced body compute the same scores, up
  # to float32 rounding of the loss divided by sigma (1 ulp / 1e-4 ~ 2e-3).
  np.testing.assert_allclose(
      timed['baffle_tff']()['update'], variants['baffle'](), atol=2e-2)
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
  return dict(num_params=net.num_params,
              seconds={k: statistics.median(v) for k, v in times.items()})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tff_fad.runtime.set_up_entry_point()  # No signal leaks TFF's worker.
  if _MEMORY_VARIANT.value:
    _memory_child()
    return
  random.seed(SEED)
  k = _K.value
  results = []
  try:
    for model_name in _MODELS.value:
      timing = _time_model(model_name)
      rss = {v: _peak_rss_kb(model_name, v)
             for v in ('baseline',) + _MEMORY_VARIANTS}
      delta_mb = {v: (rss[v] - rss['baseline']) / 1024.0
                  for v in _MEMORY_VARIANTS}
      s = timing['seconds']
      results.append(collections.OrderedDict(
          model=model_name, image_shape=list(_image_shape()),
          num_params=timing['num_params'],
          batch_size=_BATCH.value, K=k, repeats=_REPEATS.value,
          seconds=s,
          time_ratios=collections.OrderedDict(
              baffle_over_backprop=s['baffle'] / s['backprop'],
              baffle_over_forwards=s['baffle'] / s['forwards'],
              baffle_tff_over_baffle=s['baffle_tff'] / s['baffle']),
          peak_rss_kb=rss,
          peak_rss_delta_mb=delta_mb,
          memory_ratios=collections.OrderedDict(
              baffle_over_backprop=(delta_mb['baffle'] / delta_mb['backprop']
                                    if delta_mb['backprop'] > 0 else None),
              baffle_over_inference=(
                  delta_mb['baffle'] / delta_mb['inference']
                  if delta_mb['inference'] > 0 else None))))
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
  print('\n'.join(lines))
  os.makedirs(os.path.dirname(_OUTPUT.value) or '.', exist_ok=True)
  with open(_OUTPUT.value, 'w') as f:
    json.dump(dict(K=k, batch_size=_BATCH.value, repeats=_REPEATS.value,
                   memory_calls=_MEMORY_CALLS.value, results=results),
              f, indent=2)
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
