"""Bad input gets a clear error that names the problem."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_fad

SERVER_VEC = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.SERVER)
CLIENT_VEC = tff.FederatedType(tff.TensorType(np.float32, [2]), tff.CLIENTS)
CLIENT_COUNT = tff.FederatedType(np.int32, tff.CLIENTS)
SERVER_INT = tff.FederatedType(np.int32, tff.SERVER)


def dot(w, x):
  return tf.reduce_sum(w * x)


@tff_fad.federated_computation(SERVER_VEC, CLIENT_VEC, SERVER_INT)
def program(w, x, steps):
  del steps
  return tff_fad.federated_sum(
      tff_fad.federated_map(dot, (tff_fad.federated_broadcast(w), x)))


def test_integer_argument_cannot_be_differentiated():
  with pytest.raises(tff_fad.NotDifferentiableError,
                     match=r"argument 'steps' of type int32@SERVER"):
    tff_fad.grad(program, wrt='steps')


@pytest.mark.parametrize('wrt, message', [
    ('nope', r"wrt='nope' is not a parameter of program; parameters are "
             r"\['w', 'x', 'steps'\]"),
    (7, 'wrt=7 is out of range: program has 3 parameter'),
    ((), 'wrt is empty'),
    ((0, 'w'), "names argument 'w' twice"),
    (1.5, 'must be parameter positions or names'),
])
def test_bad_wrt(wrt, message):
  with pytest.raises(tff_fad.FederatedADError, match=message):
    tff_fad.vjp(program, wrt=wrt)


def test_grad_needs_a_scalar_server_output():
  @tff_fad.federated_computation(SERVER_VEC, CLIENT_VEC)
  def vector_output(w, x):
    return tff_fad.federated_mean(tff_fad.federated_map(
        lambda w, x: w * x, (tff_fad.federated_broadcast(w), x)))

  with pytest.raises(tff_fad.FederatedADError,
                     match=r'one floating-point scalar at the server.*'
                           r'returns float32\[2\]@SERVER'):
    tff_fad.grad(vector_output)


def test_unsupported_intrinsic_is_named_at_transform_time():
  @tff_fad.federated_computation(SERVER_VEC, CLIENT_VEC)
  def uses_max(w, x):
    losses = tff_fad.federated_map(dot, (tff_fad.federated_broadcast(w), x))
    return tff_fad.federated_max(losses)

  # The primal runs ...
  assert uses_max(np.ones(2, np.float32),
                  [np.array([1., 2.], np.float32)]) == 3.0
  # ... but the derivative names the intrinsic and its argument.
  for transform in (tff_fad.grad, tff_fad.jvp, tff_fad.vjp):
    with pytest.raises(tff_fad.NotDifferentiableError,
                       match=r'federated_max has no derivative rule.*'
                             r'v1: \{float32\}@CLIENTS'):
      transform(uses_max)


def test_intrinsic_without_rule_is_fine_off_the_active_path():
  @tff_fad.federated_computation(SERVER_VEC, CLIENT_VEC, CLIENT_COUNT)
  def scaled_by_max_count(w, x, count):
    losses = tff_fad.federated_map(dot, (tff_fad.federated_broadcast(w), x))
    biggest = tff_fad.federated_max(count)
    return tff_fad.federated_apply(
        lambda s, m: s * tf.cast(m, tf.float32),
        (tff_fad.federated_sum(losses), biggest))

  x = [np.array([1., 2.], np.float32), np.array([0., 1.], np.float32)]
  gradient = tff_fad.grad(scaled_by_max_count)(
      np.ones(2, np.float32), x, [3, 5])
  np.testing.assert_allclose(gradient, 5 * np.array([1., 3.]))


def test_mismatched_tangent_is_rejected_by_its_declared_type():
  jvp = tff_fad.jvp(program)
  # The tangent parameter is typed like its primal, so a wrong tangent is
  # refused, by name, before anything runs.
  assert str(jvp.type_signature.parameter[3]) == 'float32[2]@SERVER'
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"argument 'w_tangent' must have type "
                           r"float32\[2\] \(shape \[2\]\), found "
                           r"float32\[3\]"):
    jvp(np.ones(2, np.float32), [np.ones(2, np.float32)], 1,
        np.ones(3, np.float32))
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"argument 'w_tangent' must have type "
                           r"float32\[2\] \(shape \[2\]\), found "
                           r"float32\[2, 2\]"):
    jvp(np.ones(2, np.float32), [np.ones(2, np.float32)], 1,
        [np.ones(2, np.float32), np.ones(2, np.float32)])


def test_wrong_placement_is_named():
  with pytest.raises(tff_fad.PlacementError,
                     match=r"federated_broadcast: argument 'value' must be "
                           r'placed at SERVER.*\{float32\[2\]\}@CLIENTS'):
    @tff_fad.federated_computation(CLIENT_VEC)
    def broadcast_client_value(x):
      return tff_fad.federated_broadcast(x)

  with pytest.raises(tff_fad.PlacementError,
                     match=r'federated_map: argument .arg\[0\]. must be '
                           r'placed at CLIENTS'):
    @tff_fad.federated_computation(SERVER_VEC)
    def map_server_value(w):
      return tff_fad.federated_map(tf.reduce_sum, w)


def test_parameters_must_be_federated():
  with pytest.raises(tff_fad.PlacementError, match="Parameter 'w'"):
    tff_fad.federated_computation(tff.TensorType(np.float32))(lambda w: w)


def test_primitives_outside_a_program():
  with pytest.raises(tff_fad.FederatedADError,
                     match='outside a function decorated'):
    tff_fad.federated_sum(None)


def test_non_federated_value_given_to_a_primitive():
  with pytest.raises(tff_fad.FederatedADError,
                     match="argument 'value' must be a tff_fad federated"):
    @tff_fad.federated_computation(SERVER_VEC)
    def sums_a_constant(w):
      del w
      return tff_fad.federated_sum(3.0)


def test_python_control_flow_on_a_federated_value():
  with pytest.raises(TypeError, match='Python control flow'):
    @tff_fad.federated_computation(SERVER_VEC)
    def branches(w):
      return w if w else w


def test_unknown_mode_and_forward_vjp():
  with pytest.raises(tff_fad.FederatedADError, match="Unknown mode 'sideways'"):
    tff_fad.grad(program, mode='sideways')
  with pytest.raises(tff_fad.FederatedADError,
                     match='vjp is a reverse-mode transform'):
    tff_fad.vjp(program, mode='forward')


def test_forward_mode_gradient_wrt_client_values_is_refused():
  with pytest.raises(tff_fad.FederatedADError,
                     match=r"mode='forward' cannot give the per-client "
                           r"gradient of argument 'x'"):
    tff_fad.grad(program, wrt='x', mode='forward')


def test_transforms_need_a_traced_program():
  compiled = tff.federated_computation(
      lambda x: tff.federated_sum(x), tff.FederatedType(np.float32,
                                                        tff.CLIENTS))
  with pytest.raises(tff_fad.FederatedADError,
                     match='needs a tff_fad program .* compiled by TFF cannot be differentiated'):
    tff_fad.grad(compiled)


def test_dataset_client_data_is_not_differentiable():
  dataset = tff.FederatedType(tff.SequenceType(tff.TensorType(np.float32, [2])),
                              tff.CLIENTS)

  def dataset_loss(w, ds):
    return ds.reduce(0.0, lambda acc, x: acc + tf.reduce_sum(w * x))

  @tff_fad.federated_computation(SERVER_VEC, dataset)
  def loss(w, ds):
    return tff_fad.federated_sum(
        tff_fad.federated_map(dataset_loss, (tff_fad.federated_broadcast(w),
                                             ds)))

  with pytest.raises(tff_fad.NotDifferentiableError,
                     match='takes a tf.data.Dataset .*pass differentiable '
                           'client data as tensors'):
    tff_fad.grad(loss)


def test_bad_num_directions():
  with pytest.raises(tff_fad.FederatedADError,
                     match='num_directions must be a positive int'):
    tff_fad.jvp(program, num_directions=0)


def test_wrong_function_arity_is_named():
  with pytest.raises(tff_fad.FederatedADError,
                     match=r'dot cannot take the 1 positional argument'):
    @tff_fad.federated_computation(CLIENT_VEC)
    def one_arg(x):
      return tff_fad.federated_map(dot, x)


def test_mean_of_integers_is_rejected():
  with pytest.raises(tff_fad.FederatedADError,
                     match='federated_mean needs floating-point values'):
    @tff_fad.federated_computation(CLIENT_COUNT)
    def mean_count(c):
      return tff_fad.federated_mean(c)


def test_nested_program_values_cannot_leak_between_traces():
  captured = {}

  @tff_fad.federated_computation(SERVER_VEC)
  def first(w):
    captured['w'] = w
    return tff_fad.federated_broadcast(w)

  with pytest.raises(tff_fad.FederatedADError,
                     match='belongs to a different tff_fad program'):
    @tff_fad.federated_computation(SERVER_VEC)
    def second(w):
      del w
      return tff_fad.federated_broadcast(captured['w'])


def test_structured_weight_is_rejected():
  with pytest.raises(tff_fad.FederatedADError,
                     match='weight must be a scalar per client'):
    @tff_fad.federated_computation(CLIENT_VEC)
    def weighted_by_vector(x):
      return tff_fad.federated_mean(x, weight=x)


def test_error_does_not_corrupt_later_traces():
  with pytest.raises(tff_fad.FederatedADError):
    @tff_fad.federated_computation(CLIENT_COUNT)
    def broken(c):
      return tff_fad.federated_mean(c)

  @tff_fad.federated_computation(CLIENT_VEC)
  def fine(x):
    return tff_fad.federated_sum(x)

  assert len(fine.program.nodes) == 1
  np.testing.assert_allclose(fine([np.ones(2, np.float32)] * 2), [2., 2.])
