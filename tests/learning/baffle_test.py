"""Tests for tff_fad.learning.baffle."""

import collections
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.tensorflow_libs import serialization_utils

import tff_fad
from tff_fad.data import digits
from tff_fad.learning import baffle
from tff_fad.learning import functional_models as fm
from tff_fad.learning import models
from tff_fad.learning import optimizers


def _linear_net(num_features: int, num_classes: int) -> models.FunctionalNet:
  """Softmax regression on flattened images: n = (d + 1) * classes."""
  return models.linear((num_features,), num_classes)


@pytest.fixture(scope='module')
def sklearn_digits():
  return digits.load_federated_digits(num_clients=3, source='sklearn', seed=0)


def _first_batch(fed, size=64):
  x, y = fed.test['x'][:size], fed.test['y'][:size]
  return tf.constant(x), tf.constant(y)


def _cosine(a, b):
  a = np.concatenate([np.ravel(t) for t in a])
  b = np.concatenate([np.ravel(t) for t in b])
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _estimate_and_truth(net, params, x, y, num_perturbations, sigma,
                        estimator, seeds):
  """Returns (estimates per seed, true gradient) for one minibatch."""
  params = [tf.constant(p) for p in params]
  shapes = [p.shape for p in params]

  def loss_fn(ps):
    return models.sparse_softmax_loss(net.apply(ps, x), y)

  @tf.function
  def estimate(seed):
    scores, _ = baffle.estimate_scores(loss_fn, params, seed,
                                       num_perturbations, sigma, estimator)
    return baffle.rebuild_gradient(shapes, seed, scores)

  # Test-side reference only; the clients never build a tape.
  with tf.GradientTape() as tape:
    tape.watch(params)
    loss = loss_fn(params)
  truth = [g.numpy() for g in tape.gradient(loss, params)]
  estimates = [[g.numpy() for g in estimate(tf.constant([s, 7], tf.int64))]
               for s in seeds]
  return estimates, truth


@pytest.mark.parametrize('estimator, sigma', [
    ('jvp', 1e-4), ('central', 1e-3), ('forward', 1e-3)])
@pytest.mark.parametrize('num_perturbations', [10, 100])
def test_cosine_similarity_matches_theory(sklearn_digits, estimator, sigma,
                                          num_perturbations):
  net = _linear_net(64, 10)
  n = net.num_params  # 650
  x, y = _first_batch(sklearn_digits)
  estimates, truth = _estimate_and_truth(net, net.init(1), x, y,
                                         num_perturbations, sigma, estimator,
                                         seeds=range(20))
  mean_cos = np.mean([_cosine(e, truth) for e in estimates])
  theory = np.sqrt(num_perturbations / (num_perturbations + n + 1))
  # theory = 0.123 (K=10) and 0.364 (K=100); the mean over 20 seeds has a
  # standard error of about 0.01.
  assert abs(mean_cos - theory) < 0.04, (mean_cos, theory)


def test_large_k_on_tiny_linear_model_approaches_true_gradient():
  net = _linear_net(2, 2)  # n = 6.
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=(32, 2)), tf.float32)
  y = tf.constant(rng.integers(0, 2, size=32), tf.int32)
  (estimate,), truth = _estimate_and_truth(net, net.init(0), x, y, 20_000,
                                           1e-3, 'central', seeds=[0])
  flat_e = np.concatenate([e.ravel() for e in estimate])
  flat_t = np.concatenate([t.ravel() for t in truth])
  # Expected relative error sqrt((n + 1) / K) = 0.019.
  assert np.linalg.norm(flat_e - flat_t) / np.linalg.norm(flat_t) < 0.06
  assert _cosine(estimate, truth) > 0.998


def test_server_and_client_regenerate_identical_perturbations():
  shapes = [(5, 5, 1, 16), (16,), (64, 10)]
  seed, k = np.array([3, 11], np.int64), 4

  # The client computation runs in TFF's C++ runtime; the server's in another
  # computation; eager is a third place. All must agree bit for bit.
  @tff.tensorflow.computation(tff.TensorType(np.int64, [2]),
                              tff.TensorType(np.int32))
  def client_side(s, k_):
    return tuple(baffle.perturbation(shapes, s, k_))

  on_client = client_side(seed, k)
  eager = baffle.perturbation(shapes, tf.constant(seed), tf.constant(k))
  for a, b in zip(on_client, eager):
    np.testing.assert_array_equal(a, b.numpy())
  # Standard normal, and different directions for a different k or seed.
  flat = np.concatenate([np.ravel(t) for t in on_client])
  assert abs(flat.mean()) < 0.05 and abs(flat.std() - 1.0) < 0.05
  other_k = baffle.perturbation(shapes, tf.constant(seed), tf.constant(k + 1))
  other_seed = baffle.perturbation(shapes, tf.constant([3, 12], tf.int64),
                                   tf.constant(k))
  assert not np.allclose(eager[0], other_k[0])
  assert not np.allclose(eager[0], other_seed[0])


def test_server_rebuild_uses_the_clients_directions():
  """With a linear loss the jvp scores are z_k . c; rebuild gives g_hat."""
  c = [tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3)),
       tf.constant([1.0, -2.0], tf.float32)]
  shapes = [t.shape for t in c]
  seed = tf.constant([5, 0], tf.int64)

  def loss_fn(ps):
    return tf.add_n([tf.reduce_sum(p * ci) for p, ci in zip(ps, c)])

  scores, _ = baffle.estimate_scores(loss_fn, [tf.zeros(s) for s in shapes],
                                     seed, 8, 1e-3, 'jvp')
  expected_scores, expected_g = [], [np.zeros(s, np.float32) for s in shapes]
  for k in range(8):
    z = baffle.perturbation(shapes, seed, tf.constant(k))
    d = sum(float(tf.reduce_sum(zi * ci)) for zi, ci in zip(z, c))
    expected_scores.append(d)
    expected_g = [g + d * zi.numpy() / 8 for g, zi in zip(expected_g, z)]
  np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5)
  rebuilt = baffle.rebuild_gradient(shapes, seed, scores)
  for a, b in zip(rebuilt, expected_g):
    np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-5)


_GRADIENT_OP = re.compile(r'(Grad$|GradGrad$|Backprop|SymbolicGradient|'
                          r'BroadcastGradientArgs)')


def _graph_op_types(comp):
  proto = tff.framework.ConcreteComputation.get_proto(comp)
  graph_def = serialization_utils.unpack_graph_def(proto.tensorflow.graph_def)
  nodes = list(graph_def.node)
  for function in graph_def.library.function:
    nodes.extend(function.node_def)
  return {n.op for n in nodes}, {n.name for n in nodes}


@pytest.mark.parametrize('parallel', [1, 4, 25])
@pytest.mark.parametrize('mode', baffle.MODES)
@pytest.mark.parametrize('estimator', ['forward', 'central'])
def test_client_graph_has_no_gradient_ops(estimator, mode, parallel):
  model = models.to_functional_model(models.lenet(), (32, 32, 1))
  # K=6: at P=4 one full chunk of 4 and a chunk of 2; at P=25, one of 6.
  client = baffle.build_client_work(model, num_perturbations=6,
                                    estimator=estimator, mode=mode,
                                    parallel_perturbations=parallel)
  op_types, names = _graph_op_types(client)
  assert 'Conv2D' in op_types and 'StatelessRandomNormalV2' in op_types
  assert not {op for op in op_types if _GRADIENT_OP.search(op)}
  assert not [n for n in names if 'gradients' in n.lower()]
  if parallel > 1:  # The batched pass: kernels stacked for a grouped conv.
    assert 'Einsum' in op_types


def _lenet_batch(batch_size=32, seed=0):
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(
      x=tf.constant(rng.random((batch_size, 32, 32, 1), np.float32)),
      y=tf.constant(rng.integers(0, 10, batch_size).astype(np.int32)))


@pytest.mark.parametrize('estimator', ['forward', 'central'])
@pytest.mark.parametrize('parallel', [1, 4, 25])
def test_batched_perturbations_give_the_scores_of_one_at_a_time(estimator,
                                                                parallel):
  model = models.to_functional_model(models.lenet(), (32, 32, 1), seed=2)
  weights = [tf.constant(w) for w in model.initial_weights[0]]
  batch = _lenet_batch()
  seed = tf.constant([4, 9], tf.int64)
  sigma, k = 1e-2, 30  # 30 = 7 x 4 + 2 = 1 x 25 + 5: a remainder chunk.

  @tf.function
  def scores(p):
    return baffle.estimate_scores(
        baffle.batch_loss_fn(model, (), batch), weights, seed, k, sigma,
        estimator, p,
        stacked_loss_fn=baffle.stacked_batch_loss_fn(model, (), batch))

  one, loss_one = scores(1)
  batched, loss_batched = scores(parallel)
  assert batched.shape == (k,)
  # A score is a difference of two float32 losses divided by sigma (2 sigma
  # for central): a few ulps of the loss, over sigma.
  rounding = 8 * np.finfo(np.float32).eps * float(loss_one) / sigma
  np.testing.assert_allclose(batched.numpy(), one.numpy(), rtol=0,
                             atol=rounding)
  np.testing.assert_allclose(float(loss_batched), float(loss_one), rtol=1e-6)
  # Not trivially equal: the scores vary (directional derivatives).
  assert np.std(one.numpy()) > 100 * rounding


def test_batched_scores_without_a_stacked_model_vectorize_its_predict():
  """A plain TFF FunctionalModel: `tf.vectorized_map` over its weight sets."""
  net = models.lenet()
  stacked_model = models.to_functional_model(net, (32, 32, 1), seed=1)
  plain = tff.learning.models.FunctionalModel(
      initial_weights=stacked_model.initial_weights,
      predict_on_batch_fn=tf.function(
          lambda weights, x, training=True: net.apply(weights[0], x)),
      loss_fn=lambda output, label, sample_weight=None: (
          models.sparse_softmax_loss(output, label)),
      input_spec=stacked_model.input_spec)
  assert not hasattr(plain, 'predict_on_stacked_batch')
  weights = [tf.constant(w) for w in plain.initial_weights[0]]
  batch = _lenet_batch(8, seed=1)
  seed = tf.constant([1, 2], tf.int64)
  results = [baffle.estimate_scores(
      baffle.batch_loss_fn(m, (), batch), weights, seed, 5, 1e-2, 'forward',
      p, stacked_loss_fn=baffle.stacked_batch_loss_fn(m, (), batch))[0]
             for m, p in [(plain, 1), (plain, 3), (stacked_model, 3)]]
  rounding = 8 * np.finfo(np.float32).eps * 2.5 / 1e-2
  for r in results[1:]:
    np.testing.assert_allclose(r.numpy(), results[0].numpy(), atol=rounding)


def test_stacked_perturbations_are_the_per_k_ones():
  shapes = [(5, 5, 1, 16), (16,), (64, 10)]
  seed = tf.constant([3, 11], tf.int64)
  stacked = baffle.stacked_perturbations(shapes, seed, tf.constant(2), 3)
  for i in range(3):
    single = baffle.perturbation(shapes, seed, tf.constant(2 + i))
    for a, b in zip(stacked, single):
      np.testing.assert_array_equal(a[i].numpy(), b.numpy())


def test_batched_perturbations_train_like_one_at_a_time(sklearn_digits):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  data = _client_datasets(sklearn_digits, 2, 16)
  final = []
  for parallel in (1, 4):
    process = baffle.build_baffle(model, num_perturbations=10, sigma=1e-2,
                                  parallel_perturbations=parallel, seed=3)
    state = process.initialize()
    for _ in range(2):
      state = process.next(state, data).state
    final.append(np.concatenate(
        [np.ravel(w) for w in state.global_model_weights.trainable]))
  initial = np.concatenate([np.ravel(w) for w in model.initial_weights[0]])
  assert not np.allclose(final[0], initial)
  np.testing.assert_allclose(final[1], final[0], atol=1e-5)


def test_gradient_op_check_detects_backprop():
  """The inspection above can fail: a client with a tape is caught."""
  model = models.to_functional_model(models.lenet(), (32, 32, 1))

  @tff.tensorflow.computation(tff.TensorType(np.float32, [2, 32, 32, 1]))
  def backprop_client(x):
    weights = [tf.constant(w) for w in model.initial_weights[0]]
    with tf.GradientTape() as tape:
      tape.watch(weights)
      loss = tf.reduce_sum(model.predict_on_batch((weights, ()), x, True))
    return tape.gradient(loss, weights)[0]

  op_types, _ = _graph_op_types(backprop_client)
  assert 'Conv2DBackpropFilter' in op_types


def test_upload_is_k_scalars():
  model = models.to_functional_model(models.lenet(), (32, 32, 1))
  client = baffle.build_client_work(model, num_perturbations=100)
  result = client.type_signature.result
  assert result['update'].is_equivalent_to(tff.TensorType(np.float32, [100]))
  process = baffle.build_baffle(model, num_perturbations=100)
  cost = tff_fad.communication_cost(process.next, 3)
  # K scores + aggregation weight + the model's 3 metric sums, all float32.
  assert cost.client_to_server_bytes_per_client == 4 * (100 + 1 + 3)


def _counting_net(path: str) -> models.FunctionalNet:
  """A softmax regression that appends a line to `path` at each pass."""
  net = _linear_net(4, 2)

  def apply(params, x):
    # The weights in the line: TF merges prints of equal inputs.
    marked = tf.print('pass', tf.reduce_sum(params[0]),
                      output_stream=f'file://{path}')
    with tf.control_dependencies([marked]):
      return net.apply(params, x)

  return models.FunctionalNet(net.name, net.param_specs, apply)


@pytest.mark.parametrize('mode', baffle.MODES)
@pytest.mark.parametrize('estimator', baffle.ESTIMATORS)
def test_forward_passes_counted_are_those_a_client_runs(estimator, mode,
                                                        tmp_path):
  path = tmp_path / 'passes.txt'
  model = models.to_functional_model(_counting_net(str(path)), (2, 2, 1))
  k = 7
  client = baffle.build_client_work(model, num_perturbations=k,
                                    estimator=estimator, mode=mode)
  batches = 3  # one_epoch takes a step per batch; fedsgd the first only.
  rng = np.random.default_rng(0)
  data = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=rng.normal(size=(12, 2, 2, 1)).astype(np.float32),
      y=rng.integers(0, 2, 12).astype(np.int32))).batch(4)
  initial = fm.initial_model_weights(model)
  client(initial, np.array([0, 1], np.int64), data)
  steps = 1 if mode == 'fedsgd' else batches
  ran = path.read_text().count('pass')
  # A jvp pass carries a primal and a tangent: counted as two.
  counted = baffle.forward_passes_per_step(estimator, k)
  assert counted == {'forward': k + 1, 'central': 2 * k + 1,
                     'jvp': 2 * k + 1}[estimator]
  per_step = 1 + k if estimator in ('forward', 'jvp') else 1 + 2 * k
  assert ran == steps * per_step
  assert counted == ran // steps + (k if estimator == 'jvp' else 0)


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_perturbations=0), 'num_perturbations'),
    (dict(num_perturbations=-3), 'num_perturbations'),
    (dict(sigma=0.0), 'sigma'),
    (dict(sigma=-1e-4), 'sigma'),
    (dict(estimator='backprop'), 'estimator'),
    (dict(mode='fedprox'), 'mode'),
    (dict(clip_value=0.0), 'clip_value'),
    (dict(ema_decay=1.0), 'ema_decay'),
    (dict(parallel_perturbations=0), 'parallel_perturbations'),
    (dict(client_clip_inf_norm=0.0), 'client_clip_inf_norm'),
    (dict(weight_decay=-1e-4), 'weight_decay'),
    (dict(ema_every=0), 'ema_every'),
    # It was silently ignored: fedsgd clients take no step.
    (dict(client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.5)),
     "client_optimizer_fn applies to mode='one_epoch' only"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
  model = models.to_functional_model(_linear_net(4, 2), (2, 2, 1))
  with pytest.raises(ValueError, match=name):
    baffle.build_baffle(model, **kwargs)


def _client_datasets(fed, num_clients, batch_size):
  return [fed.train.create_tf_dataset_for_client(c).batch(batch_size).take(1)
          for c in fed.client_ids[:num_clients]]


def test_learning_process_type_signature_and_loss_decreases(sklearn_digits):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  process = baffle.build_baffle(
      model, num_perturbations=200, estimator='jvp',
      server_optimizer_fn=tff.learning.optimizers.build_adam(0.05),
      ema_decay=0.5, seed=1)
  assert isinstance(process, tff.learning.templates.LearningProcess)
  state_type, data_type = process.next.type_signature.parameter
  assert state_type.placement is tff.SERVER
  assert data_type.is_equivalent_to(tff.FederatedType(
      tff.SequenceType(collections.OrderedDict(
          x=tff.TensorType(np.float32, [None, 8, 8, 1]),
          y=tff.TensorType(np.int32, [None]))), tff.CLIENTS))
  assert process.next.type_signature.result.metrics.placement is tff.SERVER

  data = _client_datasets(sklearn_digits, 3, 32)
  state = process.initialize()
  losses = []
  for round_num in range(4):
    output = process.next(state, data)
    state = output.state
    assert state.finalizer['round_num'] == round_num + 1
    losses.append(float(output.metrics['client_work']['train']['loss']))
  # The same batches every round, so the loss must fall.
  assert losses[-1] < losses[0] - 0.2, losses
  # EMA: the evaluated weights lag behind the trained ones.
  ema = process.get_model_weights(state)
  assert not np.allclose(ema.trainable[0], state.global_model_weights.trainable[0])


@pytest.mark.parametrize('estimator', ['forward', 'central'])
def test_one_epoch_mode_and_unweighted_aggregator_run(sklearn_digits,
                                                      estimator):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape)
  process = baffle.build_baffle(
      model, num_perturbations=20, sigma=1e-3, estimator=estimator,
      mode='one_epoch',
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.5),
      model_aggregator=tff.aggregators.UnweightedMeanFactory())
  state = process.initialize()
  data = [fed_ds.take(2) for fed_ds in _client_datasets(sklearn_digits, 2, 16)]
  output = process.next(state, data)
  before = np.concatenate([np.ravel(w) for w in state.global_model_weights.trainable])
  after = np.concatenate(
      [np.ravel(w) for w in output.state.global_model_weights.trainable])
  assert np.isfinite(after).all() and not np.allclose(before, after)
  assert output.metrics['client_work']['train']['num_examples'] == 32


def test_ema_warmup_effective_decay_follows_torch_ema():
  n = np.arange(1, 3001)
  expected = np.minimum(0.995, (1.0 + n) / (10.0 + n))
  got = baffle.ema_decay_at(0.995, tf.constant(n), warmup=True).numpy()
  np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)
  assert got[0] == pytest.approx(2 / 11) and got[-1] == pytest.approx(0.995)
  # The warm-up ends after (10 d - 1) / (1 - d) = 1,789 updates.
  assert got[1787] < 0.995 and got[1789] == pytest.approx(0.995)
  np.testing.assert_allclose(
      baffle.ema_decay_at(0.9, tf.constant(n), warmup=False).numpy(), 0.9)


def test_process_ema_updates_every_k_rounds_with_warmup(sklearn_digits):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  process = baffle.build_baffle(
      model, num_perturbations=10, sigma=1e-2, ema_decay=0.995,
      ema_warmup=True, ema_every=2, seed=1)
  data = _client_datasets(sklearn_digits, 2, 16)
  state = process.initialize()
  ema = [np.array(w) for w in model.initial_weights[0]]
  num_updates = 0
  for round_num in range(1, 6):
    state = process.next(state, data).state
    if round_num % 2 == 0:  # Rounds 2 and 4: updates 1 and 2.
      num_updates += 1
      decay = min(0.995, (1 + num_updates) / (10 + num_updates))
      ema = [decay * e + (1 - decay) * np.array(w) for e, w in
             zip(ema, state.global_model_weights.trainable)]
    for got, want in zip(process.get_model_weights(state).trainable, ema):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert num_updates == 2
  assert not np.allclose(ema[0], state.global_model_weights.trainable[0])


def test_client_inf_norm_clip_scales_the_clients_own_estimate():
  model = models.to_functional_model(models.lenet(), (32, 32, 1), seed=0)
  weights = collections.OrderedDict(
      trainable=tuple(model.initial_weights[0]), non_trainable=())
  batch = collections.OrderedDict(
      (k, v.numpy()) for k, v in _lenet_batch(8).items())
  seed = np.array([2, 5], np.int64)
  shapes = [np.shape(w) for w in weights['trainable']]
  estimates = {}
  for clip in (None, 1e-3, 1e6):
    client = baffle.build_client_work(model, num_perturbations=8,
                                      client_clip_inf_norm=clip,
                                      clip_value=None)
    scores = client(weights, seed, [batch])['update']
    estimates[clip] = [g.numpy() for g in baffle.rebuild_gradient(
        shapes, tf.constant(seed), tf.constant(scores))]
  inf_norm = lambda g: max(np.abs(t).max() for t in g)
  assert inf_norm(estimates[None]) > 1e-2
  # Rescaled to inf-norm 1e-3 (torch's 1e-6 guard), direction kept.
  assert inf_norm(estimates[1e-3]) == pytest.approx(1e-3, rel=1e-3)
  assert _cosine(estimates[1e-3], estimates[None]) > 0.9999
  for a, b in zip(estimates[1e6], estimates[None]):
    np.testing.assert_array_equal(a, b)  # Below the bound: untouched.


def test_weight_decay_adds_the_l2_term(sklearn_digits):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  data = _client_datasets(sklearn_digits, 2, 16)
  after = {}
  for wd in (0.0, 0.1):
    process = baffle.build_baffle(
        model, server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
        num_perturbations=10, sigma=1e-2, weight_decay=wd, seed=1)
    state = process.next(process.initialize(), data).state
    after[wd] = state.global_model_weights.trainable
  for w0, a, b in zip(model.initial_weights[0], after[0.0], after[0.1]):
    np.testing.assert_allclose(b - a, -0.1 * w0, rtol=1e-4, atol=1e-6)


def test_per_client_directions_server_rebuilds_the_mean_client_estimate(
    sklearn_digits):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  k, sigma = 20, 1e-2
  process = baffle.build_baffle(
      model, server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
      num_perturbations=k, sigma=sigma, clip_value=None,
      directions='per_client', seed=4)
  data = _client_datasets(sklearn_digits, 3, 16)
  state = process.initialize()
  new_state = process.next(state, data).state
  applied = [w0 - w1 for w0, w1 in zip(
      state.global_model_weights.trainable,
      new_state.global_model_weights.trainable)]  # SGD 1.0: the estimate.

  # Each client's own estimate, computed directly from what it uploads.
  client = baffle.build_client_work(model, num_perturbations=k, sigma=sigma,
                                    clip_value=None, directions='per_client')
  round_seed = baffle.round_seed(4, 0).numpy()
  weights = collections.OrderedDict(
      trainable=tuple(state.global_model_weights.trainable), non_trainable=())
  shapes = [np.shape(w) for w in weights['trainable']]
  estimates, client_weights, seeds = [], [], []
  for ds in data:
    out = client(weights, round_seed, ds)
    seeds.append(tuple(out['update']['seed']))
    estimates.append([g.numpy() for g in baffle.rebuild_gradient(
        shapes, tf.constant(out['update']['seed']),
        tf.constant(out['update']['scores']))])
    client_weights.append(out['weight'])
  assert len(set(seeds)) == 3  # Each client its own directions.
  total = sum(client_weights)
  for i, got in enumerate(applied):
    want = sum(w * e[i] for w, e in zip(client_weights, estimates)) / total
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Upload: K scores + the 8-byte seed + weight + 3 metric sums.
  cost = tff_fad.communication_cost(process.next, 3)
  assert cost.client_to_server_bytes_per_client == 4 * (k + 1 + 3) + 8


def test_shared_jvp_round_is_the_cores_seeded_forward_mode(sklearn_digits):
  """One `'jvp'` round with shared directions equals tff_fad.jvp of the
  federated mean loss with tangents drawn from the round seed: the K
  averaged scores are that jvp's output tangents, and the server's update
  is their rebuild. (Per-client directions and the clients' own clip are
  not one jvp of the broadcast model, so BAFFLE emits its round itself.)"""
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  k, seed = 12, 4
  process = baffle.build_baffle(
      model, server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
      num_perturbations=k, estimator='jvp', clip_value=None, seed=seed)
  # Batches of different sizes: the round weights clients by examples.
  data = [sklearn_digits.train.create_tf_dataset_for_client(c).batch(b).take(1)
          for c, b in zip(sklearn_digits.client_ids, (16, 9, 5))]
  state = process.initialize()
  output = process.next(state, data)
  applied = [w0 - w1 for w0, w1 in zip(
      state.global_model_weights.trainable,
      output.state.global_model_weights.trainable)]  # SGD 1.0: the estimate.

  trainable = tuple(state.global_model_weights.trainable)
  params_type = tff.types.to_type(
      [tff.TensorType(np.float32, np.shape(w)) for w in trainable])
  batch_type = tff.types.tensorflow_to_type(data[0].element_spec)

  def loss(params, batch):
    return fm.batch_loss(model, (tuple(params), ()), batch, training=True)[0]

  def count(batch):
    return tf.cast(tf.shape(batch['y'])[0], tf.float32)

  @tff_fad.federated_computation(tff.FederatedType(params_type, tff.SERVER),
                                 tff.FederatedType(batch_type, tff.CLIENTS))
  def mean_loss(params, batches):
    return tff_fad.federated_mean(
        tff_fad.federated_map(loss, (tff_fad.federated_broadcast(params),
                                     batches)),
        tff_fad.federated_map(count, batches))

  round_seed = baffle.round_seed(seed, 0)
  value, scores = tff_fad.jvp(mean_loss, num_directions=k, tangent_seed=True)(
      list(trainable), [next(iter(ds)) for ds in data], round_seed.numpy())
  assert float(output.metrics['client_work']['train']['loss']) == (
      pytest.approx(value, rel=1e-6))
  # The server's rebuild, (1/K) sum_k score_k z_k, from the core's own
  # directions (not BAFFLE's rebuild_gradient).
  directions = tff_fad.seeded_tangents(round_seed, [list(trainable)], k)[0]
  for got, z in zip(applied, directions, strict=True):
    want = np.tensordot(np.asarray(scores), np.asarray(z), axes=1) / k
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('server', ['nesterov', 'sgdm'])
def test_momentum_and_schedule_are_the_hand_written_update(sklearn_digits,
                                                           server):
  """Three rounds of the exact (jvp) estimator with a warmed-up, decaying
  momentum server equal the update written out by hand: backprop
  directional derivatives along the round's seeded directions, rebuilt,
  then `w -= lr_t * (g + m v)` (Nesterov) or `w -= lr_t * v` (heavy ball)
  with `v = m v + g`."""
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  k, seed, rounds, momentum = 6, 3, 3, 0.9
  schedule = optimizers.learning_rate_schedule(0.5, total_steps=rounds,
                                               decay='cosine', warmup_steps=1)
  inner = (optimizers.build_nesterov_sgdm(0.5, momentum) if server ==
           'nesterov' else tff.learning.optimizers.build_sgdm(0.5, momentum))
  process = baffle.build_baffle(
      model, server_optimizer_fn=(
          tff.learning.optimizers.schedule_learning_rate(inner, schedule)),
      num_perturbations=k, estimator='jvp', clip_value=None, seed=seed)
  data = [sklearn_digits.train.create_tf_dataset_for_client(c).batch(b).take(1)
          for c, b in zip(sklearn_digits.client_ids, (16, 9, 5))]
  state = process.initialize()
  weights = [np.asarray(w, np.float64)
             for w in state.global_model_weights.trainable]
  for _ in range(rounds):
    state = process.next(state, data).state

  batches = [next(iter(ds)) for ds in data]
  x = tf.concat([b['x'] for b in batches], 0)
  y = tf.concat([b['y'] for b in batches], 0)
  velocity = [np.zeros_like(w) for w in weights]
  for t in range(rounds):
    params = [tf.constant(w, tf.float32) for w in weights]
    with tf.GradientTape() as tape:  # Test-side reference only.
      tape.watch(params)
      # The clients' example-weighted mean loss is the loss of their union.
      loss = fm.batch_loss(model, (tuple(params), ()), dict(x=x, y=y),
                           training=True)[0]
    gradient = [g.numpy() for g in tape.gradient(loss, params)]
    directions = tff_fad.seeded_tangents(baffle.round_seed(seed, t),
                                         [params], k)[0]
    scores = [sum(float(np.vdot(g, z[i])) for g, z in zip(gradient,
                                                          directions))
              for i in range(k)]
    estimate = [np.tensordot(scores, np.asarray(z), axes=1) / k
                for z in directions]
    rate = float(schedule(t))
    for i, g in enumerate(estimate):
      velocity[i] = momentum * velocity[i] + g
      step = g + momentum * velocity[i] if server == 'nesterov' else (
          velocity[i])
      weights[i] = weights[i] - rate * step
  for got, want in zip(state.global_model_weights.trainable, weights):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_per_client_directions_refuse_secure_sums():
  model = models.to_functional_model(_linear_net(4, 2), (2, 2, 1))
  with pytest.raises(ValueError, match='secure sums need every client'):
    baffle.build_baffle(
        model, directions='per_client',
        model_aggregator=tff.aggregators.SecureSumFactory(2.0**20))
  with pytest.raises(ValueError, match='directions'):
    baffle.build_baffle(model, directions='own')
  with pytest.raises(ValueError, match='one_epoch'):
    baffle.build_baffle(model, directions='per_client', mode='one_epoch')


@pytest.mark.parametrize('directions', ['shared', 'per_client'])
def test_estimate_cosine_to_gradient_is_the_weighted_mean_estimates_cosine(
    sklearn_digits, directions):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  weights = model.initial_weights
  k, seed = 30, 5
  # Batches of different sizes: the clients weigh by examples.
  x, y = sklearn_digits.test['x'], sklearn_digits.test['y']
  batches = [collections.OrderedDict(x=x[a:b], y=y[a:b])
             for a, b in [(0, 8), (8, 40), (40, 56)]]
  got = baffle.estimate_cosine_to_gradient(
      model, weights, batches, num_perturbations=k, estimator='jvp',
      directions=directions, seed=seed)

  # The same math from its definition: each client's exact directional
  # derivatives along its K directions, (1/K) sum_k <g_i, z_k> z_k.
  trainable = [tf.constant(w) for w in weights[0]]
  shapes = [w.shape for w in trainable]
  estimate_sum = [np.zeros(s) for s in shapes]
  gradient_sum = [np.zeros(s) for s in shapes]
  client_gradients = []
  for i, batch in enumerate(batches):
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      loss = model.loss(model.predict_on_batch((trainable, ()), batch['x']),
                        batch['y'])
    g = [t.numpy() for t in tape.gradient(loss, trainable)]
    client_gradients.append(np.concatenate([np.ravel(t) for t in g]))
    client_seed = tf.constant([seed, i if directions == 'per_client' else 0],
                              tf.int64)
    count = len(batch['y'])
    for j in range(k):
      z = [t.numpy() for t in baffle.perturbation(shapes, client_seed, j)]
      score = sum(float(np.sum(a * b)) for a, b in zip(g, z))
      estimate_sum = [e + count * score * t / k
                      for e, t in zip(estimate_sum, z)]
    gradient_sum = [a + count * b for a, b in zip(gradient_sum, g)]
  total = sum(len(b['y']) for b in batches)
  assert got['cosine'] == pytest.approx(_cosine(estimate_sum, gradient_sum),
                                        abs=1e-5)
  flat = lambda ts: np.concatenate([np.ravel(t) for t in ts])
  assert got['gradient_norm'] == pytest.approx(
      np.linalg.norm(flat(gradient_sum)) / total, rel=1e-5)
  assert got['estimate_norm'] == pytest.approx(
      np.linalg.norm(flat(estimate_sum)) / total, rel=1e-4)
  independent = k * (3 if directions == 'per_client' else 1)
  assert got['expected_cosine'] == pytest.approx(np.sqrt(independent / 650))
  # Predicted from the norms: E|estimate_i - g_i|^2 = |g_i|^2 (n + 1) / K.
  mean = flat(gradient_sum) / total
  if directions == 'per_client':
    noise = sum((len(b['y']) / total)**2 * np.sum(g**2) for b, g in zip(
        batches, client_gradients)) * 651 / k
  else:
    noise = np.sum(mean**2) * 651 / k
  assert got['predicted_cosine'] == pytest.approx(
      np.linalg.norm(mean) / np.sqrt(np.sum(mean**2) + noise), rel=1e-5)


def test_estimate_cosine_to_gradient_nears_one_for_k_much_above_n():
  net = _linear_net(2, 2)  # n = 6.
  model = models.to_functional_model(net, (2,), seed=0)
  rng = np.random.default_rng(0)
  batch = collections.OrderedDict(
      x=rng.normal(size=(32, 2)).astype(np.float32),
      y=rng.integers(0, 2, size=32).astype(np.int32))
  got = baffle.estimate_cosine_to_gradient(
      model, model.initial_weights, [batch], num_perturbations=5_000,
      sigma=1e-3, estimator='central')
  assert got['expected_cosine'] == 1.0
  assert got['predicted_cosine'] == pytest.approx(np.sqrt(5_000 / 5_007))
  assert got['cosine'] > 0.99


@pytest.mark.parametrize('kwargs, message', [
    (dict(directions='own'), 'directions must be one of'),
    (dict(estimator='backprop'), 'estimator must be one of'),
    (dict(num_perturbations=0), 'num_perturbations'),
])
def test_estimate_cosine_to_gradient_names_bad_arguments(kwargs, message):
  model = models.to_functional_model(_linear_net(2, 2), (2,), seed=0)
  batch = collections.OrderedDict(x=np.zeros((4, 2), np.float32),
                                  y=np.zeros(4, np.int32))
  arguments = dict(num_perturbations=4)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=message):
    baffle.estimate_cosine_to_gradient(model, model.initial_weights, [batch],
                                       **arguments)
  with pytest.raises(ValueError, match='at least one batch'):
    baffle.estimate_cosine_to_gradient(model, model.initial_weights, [],
                                       num_perturbations=4)


def test_predicted_cosine_matches_the_measured_mean_for_differing_clients(
    sklearn_digits):
  model = models.to_functional_model(_linear_net(64, 10),
                                     sklearn_digits.image_shape, seed=0)
  x, y = sklearn_digits.test['x'], sklearn_digits.test['y']
  # Clients of one or two classes each: their gradients differ a lot.
  batches = [collections.OrderedDict(x=x[np.isin(y, c)][:16],
                                     y=y[np.isin(y, c)][:16])
             for c in ([0], [1, 7], [3], [4, 9])]
  results = [baffle.estimate_cosine_to_gradient(
      model, model.initial_weights, batches, num_perturbations=40,
      estimator='jvp', directions='per_client', seed=seed)
             for seed in range(12)]
  predicted = results[0]['predicted_cosine']
  assert all(r['predicted_cosine'] == predicted for r in results)
  # Heterogeneity lowers it well below the figure for one gradient...
  assert predicted < 0.8 * results[0]['expected_cosine']
  # ...and the measured cosines agree (12 seeds: standard error ~0.01).
  assert np.mean([r['cosine'] for r in results]) == pytest.approx(
      predicted, abs=0.03)
