"""Exact type signatures of every learning process (as TFF's own tests assert).

A linear model on 8x8 digits: weights <float32[64,10],float32[10]>. Each
process is a `LearningProcess` whose `initialize`, `next` and
`get_model_weights` have exactly these types; a change of state or metrics
layout shows here first.
"""

import pytest

from tff_fad.data import digits
from tff_fad.learning import baffle
from tff_fad.learning import hypergradient_fed_avg as hg
from tff_fad.learning import models

_WEIGHTS = '<float32[64,10],float32[10]>'
_MODEL = f'<trainable={_WEIGHTS},non_trainable=<>>'
_DATA = '{<x=float32[?,8,8,1],y=int32[?]>*}'
_ADAM_HPARAMS = ('learning_rate=float32,beta_1=float32,beta_2=float32,'
                 'epsilon=float32,step=int32')
_MEAN_STATE = 'aggregator=<value_sum_process=<>,weight_sum_process=<>>'
_MEAN_METRICS = 'aggregator=<mean_value=<>,mean_weight=<>>'
_TRAIN_METRICS = ('client_work=<train=<loss=float32,accuracy=float32,'
                  'num_examples=float32>>')
_HEAD = f'global_model_weights={_MODEL},distributor=<>,client_work=<>'

_HYPERGRADIENT_STATE = (
    f'<{_HEAD},{_MEAN_STATE},finalizer=<log_lr=float32,pending={_WEIGHTS},'
    f'model_tangent={_WEIGHTS},server_optimizer=<learning_rate=float32>,'
    f'hyper_optimizer=<{_ADAM_HPARAMS},accumulator=float32,'
    'preconditioner=float32>>>')
_HYPERGRADIENT_METRICS = (
    f'<distributor=<>,{_TRAIN_METRICS},{_MEAN_METRICS},'
    'finalizer=<update_non_finite=int32>,hyperparameters=<'
    'server_learning_rate=float32,hypergradient=float32,'
    'post_update_loss=float32>>')
_WEIGHTING_STATE = (
    f'<{_HEAD},aggregator=<>,finalizer=<log_lr=float32,'
    f'weight_exponent=float32,pending={_WEIGHTS},pending_tangent={_WEIGHTS},'
    'model_tangent=<float32[2,64,10],float32[2,10]>,'
    f'hyper_optimizer=<{_ADAM_HPARAMS},accumulator=<float32,float32>,'
    'preconditioner=<float32,float32>>>>')
_WEIGHTING_METRICS = (
    f'<distributor=<>,{_TRAIN_METRICS},aggregator=<>,'
    'finalizer=<update_non_finite=int32>,hyperparameters=<'
    'server_learning_rate=float32,weight_exponent=float32,'
    'hypergradient=float32,hypergradient_weight_exponent=float32,'
    'post_update_loss=float32>>')
_BAFFLE_STATE = (
    f'<{_HEAD},{_MEAN_STATE},finalizer=<optimizer=<{_ADAM_HPARAMS},'
    f'accumulator={_WEIGHTS},preconditioner={_WEIGHTS}>,ema_weights=<>,'
    'round_num=int64>>')
_BAFFLE_METRICS = (
    f'<distributor=<>,{_TRAIN_METRICS},{_MEAN_METRICS},'
    'finalizer=<update_non_finite=int32>,gradient_estimate=<norm=float32>>')

_EXPECTED = {
    'hypergradient_forward': (_HYPERGRADIENT_STATE, _HYPERGRADIENT_METRICS),
    # Reverse mode changes how the hypergradient is computed, not the types.
    'hypergradient_reverse': (_HYPERGRADIENT_STATE, _HYPERGRADIENT_METRICS),
    'learned_weighting': (_WEIGHTING_STATE, _WEIGHTING_METRICS),
    'baffle': (_BAFFLE_STATE, _BAFFLE_METRICS),
}


@pytest.fixture(scope='module')
def model():
  fed = digits.load_federated_digits(num_clients=2, dirichlet_alpha=1.0,
                                     seed=0, source='sklearn')
  net = models.get_net('linear', fed.image_shape)
  return models.to_functional_model(net, fed.image_shape, seed=0)


def _build(name, model):
  if name == 'hypergradient_forward':
    return hg.build_hypergradient_fed_avg(model)
  if name == 'hypergradient_reverse':
    return hg.build_hypergradient_fed_avg(model, mode='reverse')
  if name == 'learned_weighting':
    return hg.build_learned_weighting_fed_avg(model)
  return baffle.build_baffle(model, num_perturbations=4)


@pytest.mark.parametrize('name', sorted(_EXPECTED))
def test_type_signatures_are_exactly(model, name):
  state, metrics = _EXPECTED[name]
  process = _build(name, model)
  assert str(process.initialize.type_signature) == f'( -> {state}@SERVER)'
  assert str(process.next.type_signature) == (
      f'(<state={state}@SERVER,client_data={_DATA}@CLIENTS> -> '
      f'<state={state}@SERVER,metrics={metrics}@SERVER>)')
  assert str(process.get_model_weights.type_signature) == (
      f'({state} -> {_MODEL})')
