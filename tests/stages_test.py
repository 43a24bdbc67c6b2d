"""Programs of several aggregation stages, on several TFF workers.

`tff_fad.stages` cuts a computation at its aggregations; `tff_fad.workers`
runs each stage split over the workers. Every derivative mode, multi-round
programs and composed transforms are compared with one process (float64:
only the order of the additions differs).
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad
from tff_fad import aggregation
from tff_fad import local_workers
from tff_fad import stages
from tff_fad import workers
from tff_fad.core import cost
# The building blocks of a stage, to find which client computations it runs.
from tensorflow_federated.python.core.impl.compiler import building_blocks as bb
from tensorflow_federated.python.core.impl.compiler import transformation_utils

RTOL = 1e-12

# ----------------------------------------------------------------------------
# The README's least squares, and two FedAvg rounds then the loss; float64.

W_TYPE = tff.FederatedType(tff.TensorType(np.float64, [2]), tff.SERVER)
EXAMPLE = collections.OrderedDict(
    x=tff.TensorType(np.float64, [2]), y=tff.TensorType(np.float64))


def squared_error(w, example):
  return 0.5 * (tf.reduce_sum(w * example['x']) - example['y']) ** 2


@tff_fad.federated_computation(W_TYPE, tff.FederatedType(EXAMPLE, tff.CLIENTS))
def least_squares(w, data):
  return tff_fad.federated_mean(
      tff_fad.federated_map(squared_error,
                            (tff_fad.federated_broadcast(w), data)))


BATCH = collections.OrderedDict(
    x=tff.TensorType(np.float64, [4, 2]), y=tff.TensorType(np.float64, [4]))


def batch_loss(w, batch):
  return 0.5 * tf.reduce_mean((tf.linalg.matvec(batch['x'], w)
                               - batch['y']) ** 2)


def local_delta(w, batch):
  """Two local gradient steps at rate 0.3; the model delta."""
  local = w
  for _ in range(2):
    with tf.GradientTape() as tape:
      tape.watch(local)
      loss = batch_loss(local, batch)
    local = local - 0.3 * tape.gradient(loss, local)
  return w - local


@tff_fad.federated_computation(W_TYPE,
                               tff.FederatedType(np.float64, tff.SERVER),
                               tff.FederatedType(BATCH, tff.CLIENTS))
def two_rounds_then_loss(w, lr, data):
  for _ in range(2):
    deltas = tff_fad.federated_map(local_delta,
                                   (tff_fad.federated_broadcast(w), data))
    w = tff_fad.federated_apply(lambda w, lr, d: w - lr * d,
                                (w, lr, tff_fad.federated_mean(deltas)))
  return tff_fad.federated_mean(
      tff_fad.federated_map(batch_loss, (tff_fad.federated_broadcast(w), data)))


def _values(num_clients=5):
  rng = np.random.default_rng(7)
  w = rng.normal(size=2)
  examples = [collections.OrderedDict(x=rng.normal(size=2),
                                      y=np.float64(rng.normal()))
              for _ in range(num_clients)]
  batches = [collections.OrderedDict(x=rng.normal(size=(4, 2)),
                                     y=rng.normal(size=4))
             for _ in range(num_clients)]
  return w, examples, batches, rng.normal(size=2)


W, EXAMPLES, BATCHES, V = _values()
LR = 0.8


def _programs():
  """(name, program, arguments) for each kind of program the tests run."""
  programs = [('least_squares', least_squares, (W, EXAMPLES)),
              ('least_squares/jvp', tff_fad.jvp(least_squares),
               (W, EXAMPLES, V)),
              ('two_rounds', two_rounds_then_loss, (W, LR, BATCHES)),
              ('two_rounds/jvp[w, lr]',
               tff_fad.jvp(two_rounds_then_loss, wrt=('w', 'lr')),
               (W, LR, BATCHES, V, 0.5))]
  for mode in tff_fad.MODES:
    programs += [
        (f'least_squares/value_and_grad[{mode}]',
         tff_fad.value_and_grad(least_squares, mode=mode), (W, EXAMPLES)),
        (f'two_rounds/value_and_grad[{mode}, w and lr]',
         tff_fad.value_and_grad(two_rounds_then_loss, wrt=('w', 'lr'),
                                mode=mode), (W, LR, BATCHES)),
        (f'two_rounds/jvp(grad[{mode}])',
         tff_fad.jvp(tff_fad.grad(two_rounds_then_loss, wrt='w', mode=mode),
                     wrt='w'), (W, LR, BATCHES, V)),
    ]
  for mode in ('reverse', 'reverse_recompute'):
    # Per-client cotangents: client-placed results of the last stage.
    programs.append((f'least_squares/grad[{mode}, w and data]',
                     tff_fad.grad(least_squares, wrt=('w', 'data'),
                                  mode=mode), (W, EXAMPLES)))
  return programs


PROGRAMS = _programs()


def _assert_close(actual, expected):
  flat_actual, flat_expected = tf.nest.flatten(actual), tf.nest.flatten(
      expected)
  assert len(flat_actual) == len(flat_expected)
  for a, e in zip(flat_actual, flat_expected):
    np.testing.assert_allclose(a, e, rtol=RTOL, atol=1e-14)


@pytest.fixture(scope='module')
def two_workers():
  with local_workers.LocalWorkers(2) as local:
    yield local


# ----------------------------------------------------------------------------
# Stages.


@pytest.mark.parametrize('name, program, args', PROGRAMS,
                         ids=[n for n, _, _ in PROGRAMS])
def test_one_stage_per_round_trip_each_with_one_aggregation_layer(
    name, program, args):
  del name, args
  program_cost = cost.communication_cost(program, num_clients=5)
  per_stage = stages.communication_cost_per_stage(program, num_clients=5)
  assert len(per_stage) == program_cost.round_trips
  assert all(stage.round_trips == 1 for stage in per_stage)
  # Each stage uploads what the program uploads in that round trip.
  assert sum(s.client_to_server_bytes_per_client for s in per_stage) == (
      program_cost.client_to_server_bytes_per_client)
  assert sum(s.server_to_client_bytes_per_client for s in per_stage) >= (
      program_cost.server_to_client_bytes_per_client)


def test_stages_carry_only_server_values():
  gradient = tff_fad.grad(two_rounds_then_loss, wrt='w', mode='reverse')
  split = stages.split_into_stages(gradient)
  # Two rounds and the loss, then the backward sweep through each of them.
  assert len(split) == 6
  assert split[0].carried_in == () and split[-1].carried_out == ()
  for before, after in zip(split, split[1:]):
    assert before.carried_out == after.carried_in
    carried = after.computation.type_signature.parameter[1]
    assert all(t.placement is tff.SERVER for t in carried)


def test_a_one_stage_program_is_not_rewritten():
  (stage,) = stages.split_into_stages(least_squares)
  assert stage.computation is least_squares.primal


def _loss_and_step(w, example):
  w = tf.identity(w, name='forward_pass_marker')
  return squared_error(w, example), 2.0 * w


def _loss_and_step_vjp(primals, active, cotangent):
  w, example = primals
  ct_loss, ct_step = cotangent
  residual = tf.reduce_sum(w * example['x']) - example['y']
  return [ct_loss * residual * example['x'] + 2.0 * ct_step if active[0]
          else None, None]


loss_and_step = tff_fad.with_derivatives(_loss_and_step,
                                         vjp=_loss_and_step_vjp)


@tff_fad.federated_computation(W_TYPE, tff.FederatedType(EXAMPLE, tff.CLIENTS))
def loss_and_mean_step(w, data):
  both = tff_fad.federated_map(loss_and_step,
                               (tff_fad.federated_broadcast(w), data))
  return tff_fad.federated_mean(both[0]), tff_fad.federated_mean(both[1])


def _client_calls_of_the_forward_pass(comp) -> int:
  """Calls, over all stages, of a TF computation running `_loss_and_step`."""
  calls = 0

  def count(block):
    nonlocal calls
    if isinstance(block, bb.CompiledComputation) and (
        b'forward_pass_marker' in block.proto.SerializeToString()):
      calls += 1
    return block, False

  for stage in stages.split_into_stages(comp):
    transformation_utils.transform_postorder(
        stage.computation.to_building_block(), count)
  return calls


@pytest.mark.parametrize('mode', ['reverse', 'reverse_recompute'])
def test_the_backward_stage_does_not_rerun_a_client_function_it_only_indexes(
    mode):
  # The transpose of selecting the loss from the client function's output
  # needs the output's type, not its value: the backward stage must not run
  # the function again (here a loss; in hypergradient FedAvg a whole local
  # training) just to build zeros for the member that was not selected.
  gradient = tff_fad.grad(loss_and_mean_step, has_aux=True, mode=mode)
  assert _client_calls_of_the_forward_pass(loss_and_mean_step) == 1
  assert _client_calls_of_the_forward_pass(gradient) == 1
  (value, step), g = tff_fad.value_and_grad(
      loss_and_mean_step, has_aux=True, mode=mode)(W, EXAMPLES)
  del value, step
  expected = np.mean([(W @ e['x'] - e['y']) * e['x'] for e in EXAMPLES],
                     axis=0)
  np.testing.assert_allclose(g, expected, rtol=RTOL)


def test_stateful_reverse_recomputes_client_values_in_its_second_stage():
  # Workers keep no client values between calls: the backward sweep's stage
  # broadcasts w again and recomputes, as reverse_recompute does.
  per_stage = {
      mode: stages.communication_cost_per_stage(
          tff_fad.grad(least_squares, mode=mode), num_clients=5)
      for mode in ('reverse', 'reverse_recompute')}
  assert per_stage['reverse'] == per_stage['reverse_recompute']
  assert per_stage['reverse'][1].intrinsics['federated_broadcast'] == 2


# ----------------------------------------------------------------------------
# Two workers vs one process.


@pytest.mark.parametrize('name, program, args', PROGRAMS,
                         ids=[n for n, _, _ in PROGRAMS])
def test_two_workers_give_the_one_process_result(name, program, args,
                                                 two_workers):
  del name
  expected = program(*args)
  with workers.worker_context(two_workers.addresses):
    actual = program(*args)
  _assert_close(actual, expected)


def test_each_worker_gets_its_own_clients_when_the_last_argument_is_server_placed(
    two_workers):
  # TFF 0.87's mergeable context gave every worker the first part of the
  # clients when a server-placed argument (here the tangent) came last.
  program = tff_fad.jvp(least_squares)
  per_client = [program(W, [example], V) for example in EXAMPLES]
  with workers.worker_context(two_workers.addresses):
    value, tangent = program(W, EXAMPLES, V)
  assert value == pytest.approx(np.mean([v for v, _ in per_client]), rel=RTOL)
  assert tangent == pytest.approx(np.mean([t for _, t in per_client]),
                                  rel=RTOL)


def test_more_parts_than_workers_and_fewer_clients_than_parts(two_workers):
  program = tff_fad.value_and_grad(two_rounds_then_loss, wrt=('w', 'lr'),
                                   mode='reverse')
  expected = program(W, LR, BATCHES[:3])
  with workers.worker_context(two_workers.addresses, num_subrounds=5):
    _assert_close(program(W, LR, BATCHES[:3]), expected)


def test_secure_sums_are_refused_on_workers_by_name(two_workers):
  d_type = tff.FederatedType(np.float32, tff.CLIENTS)

  @tff_fad.federated_computation(d_type)
  def secure_total(d):
    return aggregation.federated_secure_sum(d, clip_range=(-1.0, 1.0),
                                            num_clients_bound=10)

  with workers.worker_context(two_workers.addresses):
    with pytest.raises(workers.NotMergeableError,
                       match='federated_secure_sum_bitwidth cannot run on TFF '
                       'workers.*secure_simulation_context'):
      secure_total([0.5, 0.25])
