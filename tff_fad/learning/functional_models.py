"""How tff_fad's learning algorithms read their arguments, the way TFF does.

Every builder in `tff_fad.learning` takes what
`tff.learning.algorithms.build_weighted_fed_avg` takes for a functional
model, and reads it the same way:

* the model: a `tff.learning.models.FunctionalModel`, or a no-argument
  callable returning one (`model_fn`); a Keras model comes in through
  `tff.learning.models.functional_model_from_keras`;
* batches: a mapping with `'x'` and `'y'`, or an `(x, y)` tuple; the batch
  size is the leading dimension of the model's predictions;
* the loss: the model's own `loss(output, label)`; training metrics: the
  model's own `metrics_fns`, updated with the training pass's output and
  aggregated by a `metrics_aggregator` (default
  `tff.learning.metrics.sum_then_finalize`);
* optimizers: `tff.learning.optimizers.Optimizer`s.

`build_local_training` is TFF's own FedAvg client update
(`build_functional_model_delta_update`): same ops in the same order, so
tff_fad's algorithms with a fixed server rate reproduce TFF's FedAvg.
"""

import collections
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

FunctionalModel = tff.learning.models.FunctionalModel
ModelArg = Union[FunctionalModel, Callable[[], FunctionalModel]]
OptimizerArg = Union[tff.learning.optimizers.Optimizer,
                     Callable[[], tff.learning.optimizers.Optimizer]]
MetricsAggregator = Callable[..., tff.Computation]

_KERAS_HINT = (
    'Convert a Keras model with tff.learning.models.functional_model_from_'
    'keras(keras_model, loss_fn, input_spec, metrics_constructor).')


def resolve_model(model_fn: ModelArg, builder: str) -> FunctionalModel:
  """The `FunctionalModel` of a builder's first argument.

  Args:
    model_fn: A `FunctionalModel` or a no-argument callable returning one.
    builder: The builder's name, for error messages.

  Raises:
    TypeError: Naming what was given instead (a Keras model, a
      `tff.learning.models.VariableModel`, anything else) and how to convert.
  """
  model = model_fn
  if not isinstance(model, FunctionalModel) and callable(model) and not (
      isinstance(model, tf.keras.Model)):
    model = model_fn()
  if isinstance(model, FunctionalModel):
    return model
  if isinstance(model, tf.keras.Model):
    raise TypeError(f'{builder} takes a tff.learning.models.FunctionalModel '
                    f'(or a function returning one), got a Keras model. '
                    f'{_KERAS_HINT}')
  if isinstance(model, tff.learning.models.VariableModel):
    raise TypeError(
        f'{builder} differentiates pure functions of the weights, so it takes '
        'a tff.learning.models.FunctionalModel (or a function returning one), '
        f'got a tff.learning.models.VariableModel. {_KERAS_HINT}')
  raise TypeError(f'{builder}: the model must be a tff.learning.models.'
                  'FunctionalModel or a no-argument function returning one, '
                  f'got {type(model).__name__}.')


def resolve_optimizer(optimizer_fn: Optional[OptimizerArg], name: str,
                      default: Callable[[], tff.learning.optimizers.Optimizer]
                      ) -> tff.learning.optimizers.Optimizer:
  """A `tff.learning.optimizers.Optimizer` from an argument `name`.

  Accepts an optimizer, a no-argument callable returning one, or None (then
  `default()`). Keras optimizers are refused: tff_fad differentiates and
  serializes optimizer steps as pure functions of their state.
  """
  optimizer = default() if optimizer_fn is None else optimizer_fn
  if not isinstance(optimizer, tff.learning.optimizers.Optimizer) and (
      callable(optimizer)):
    optimizer = optimizer()
  if not isinstance(optimizer, tff.learning.optimizers.Optimizer):
    raise TypeError(
        f'{name} must be a tff.learning.optimizers.Optimizer (e.g. '
        'tff.learning.optimizers.build_sgdm(learning_rate=0.1)) or a '
        f'function returning one, got {type(optimizer).__name__}.')
  return optimizer


def batch_inputs(batch: Any) -> tuple[Any, Any]:
  """`(x, y)` of a batch given as a mapping with 'x'/'y' or an (x, y) pair."""
  if isinstance(batch, Mapping):
    if 'x' not in batch or 'y' not in batch:
      raise ValueError(
          "A batch given as a mapping must have keys 'x' and 'y' (TFF's "
          f'functional models read them so), got keys {list(batch)}. '
          "Map the dataset, e.g. ds.map(lambda e: (e['image'], e['label'])).")
    return batch['x'], batch['y']
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return batch[0], batch[1]
  raise ValueError('A batch must be a mapping with keys x and y or an (x, y) '
                   f'pair, got {type(batch).__name__} with '
                   f'{len(tf.nest.flatten(batch))} tensors.')


def stacked_predictions(model: FunctionalModel, weights, x: Any,
                        training: bool) -> Any:
  """Predictions of P weight sets on one batch, `[P, B, ...]`.

  `weights` is `(stacked_trainable, non_trainable)`, each trainable tensor
  `[P, *shape]`. Uses the model's `predict_on_stacked_batch` if it has one
  (tff_fad's `models.StackedFunctionalModel`: one batched pass), else
  `tf.vectorized_map` over the sets with `predict_on_batch` (TF falls back
  to a loop for ops it cannot vectorize, e.g. a convolution whose kernel
  varies).
  """
  stacked_trainable, non_trainable = weights
  if hasattr(model, 'predict_on_stacked_batch'):
    return model.predict_on_stacked_batch(
        (tuple(stacked_trainable), tuple(non_trainable)), x, training)
  return tf.vectorized_map(
      lambda trainable: model.predict_on_batch(
          (tuple(trainable), tuple(non_trainable)), x, training),
      tuple(stacked_trainable))


def num_examples(batch_output: Any) -> tf.Tensor:
  """The batch size (int32), as TFF counts it: predictions' first dimension."""
  return tf.shape(tf.nest.flatten(batch_output)[0])[0]


def weights_spec(model: FunctionalModel) -> tff.learning.models.ModelWeights:
  """`ModelWeights` of `tf.TensorSpec`s of the model's initial weights."""

  def spec(array):
    array = np.asarray(array)
    return tf.TensorSpec(array.shape, tf.as_dtype(array.dtype))

  return tff.learning.models.ModelWeights(
      trainable=tuple(spec(w) for w in model.initial_weights[0]),
      non_trainable=tuple(spec(w) for w in model.initial_weights[1]))


def weights_type(model: FunctionalModel) -> tff.Type:
  """The TFF type of the model's `ModelWeights`."""
  return tff.types.tensorflow_to_type(weights_spec(model))


def data_type(model: FunctionalModel) -> tff.SequenceType:
  """A client's data: a sequence of the model's batches."""
  return tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))


def initial_model_weights(model: FunctionalModel
                          ) -> tff.learning.models.ModelWeights:
  """The model's initial weights as constant tensors (inside a TF graph)."""
  return tff.learning.models.ModelWeights(
      trainable=tuple(tf.constant(w) for w in model.initial_weights[0]),
      non_trainable=tuple(tf.constant(w) for w in model.initial_weights[1]))


def batch_loss(model: FunctionalModel, weights, batch, training: bool):
  """`(mean loss, batch output, number of examples)` of one batch."""
  x, y = batch_inputs(batch)
  output = model.predict_on_batch(weights, x, training=training)
  return model.loss(output=output, label=y), output, num_examples(output)


def update_metrics(model: FunctionalModel, state, batch, output, loss):
  """The model's metrics state after one batch (TFF's `BatchOutput`)."""
  _, y = batch_inputs(batch)
  return model.update_metrics_state(
      state, batch_output=tff.learning.models.BatchOutput(
          loss=loss, predictions=output, num_examples=num_examples(output)),
      labels=y)


def client_weight(client_weighting: tff.learning.ClientWeighting,
                  has_non_finite_update: tf.Tensor,
                  example_count: tf.Tensor) -> tf.Tensor:
  """A client's aggregation weight (float32), 0 for a non-finite update."""
  if client_weighting is tff.learning.ClientWeighting.NUM_EXAMPLES:
    weight = tf.cast(example_count, tf.float32)
  else:
    weight = tf.constant(1.0)
  return tf.where(has_non_finite_update > 0, tf.constant(0.0), weight)


def check_client_weighting(client_weighting) -> None:
  if not isinstance(client_weighting, tff.learning.ClientWeighting):
    raise TypeError('client_weighting must be a tff.learning.ClientWeighting '
                    '(NUM_EXAMPLES or UNIFORM), got '
                    f'{client_weighting!r}.')


def build_local_training(
    model: FunctionalModel,
    optimizer: tff.learning.optimizers.Optimizer,
    client_weighting: tff.learning.ClientWeighting,
    first_batch: Optional[Callable[[tf.Tensor, tf.Tensor, Any], Any]] = None):
  """`(weights, dataset) -> OrderedDict(update, weight, metrics)`.

  One pass of `optimizer` over the dataset, as TFF's FedAvg client does it:
  the model's mean loss per batch (training=True), its metrics updated with
  the same pass's output, `update = initial - final` trainable weights, all
  zeros (and weight 0, metrics reset) if any value is not finite.
  `weights` is the `(trainable, non_trainable)` pair a FunctionalModel takes.

  With `first_batch`, the function returns `(outputs, first)` where `first`
  is `first_batch(loss, num_examples, gradients)` of the first batch: its
  mean training loss, example count (float32) and the loss gradient at
  `weights`, which the first local step computes anyway (zeros of the same
  structure for an empty dataset). The local steps are the same either way.
  """

  def local_training(weights, dataset):
    trainable, non_trainable = weights
    specs = tf.nest.map_structure(tf.TensorSpec.from_tensor,
                                  tuple(tf.nest.flatten(trainable)))
    if first_batch is None:
      no_batch = ()
    else:
      no_batch = tf.nest.map_structure(tf.zeros_like, first_batch(
          tf.constant(0.0), tf.constant(0.0),
          tf.nest.map_structure(tf.zeros_like, trainable)))

    def step(carry, batch):
      local, opt_state, metrics_state, count, first = carry
      with tf.GradientTape() as tape:
        tape.watch(local)
        loss, output, n = batch_loss(model, (local, non_trainable), batch,
                                     training=True)
      gradients = tape.gradient(loss, local)
      if first_batch is not None:
        # tf.where, not tf.cond: a cond in the loop body costs more per
        # client than the few values it would save computing.
        is_first = tf.equal(count, 0)
        first = tf.nest.map_structure(
            lambda new, old: tf.where(is_first, new, old),
            first_batch(loss, tf.cast(n, tf.float32), gradients), first)
      opt_state, local = optimizer.next(opt_state, local, gradients)
      metrics_state = update_metrics(model, metrics_state, batch, output,
                                     loss)
      return (local, opt_state, metrics_state, count + tf.cast(n, tf.int64),
              first)

    local, _, metrics_state, count, first = dataset.reduce(
        (trainable, optimizer.initialize(specs),
         model.initialize_metrics_state(), tf.constant(0, tf.int64),
         no_batch), step)
    update = tf.nest.map_structure(tf.subtract, trainable, local)
    update, non_finite = zero_if_non_finite(update)
    metrics_state = tf.cond(
        non_finite > 0, model.initialize_metrics_state, lambda: metrics_state)
    outputs = collections.OrderedDict(
        update=update,
        weight=client_weight(client_weighting, non_finite, count),
        metrics=metrics_state)
    return outputs if first_batch is None else (outputs, first)

  return local_training


def zero_if_non_finite(structure):
  """`(zeros if any value is not finite else structure, 1 or 0 as int32)`."""
  flat = tf.nest.flatten(structure)
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in flat])
  zeroed = [tf.where(finite, t, tf.zeros_like(t)) for t in flat]
  return (tf.nest.pack_sequence_as(structure, zeroed),
          tf.cast(tf.logical_not(finite), tf.int32))


def metrics_type(model: FunctionalModel) -> tff.Type:
  """The TFF type of the model's unfinalized metrics state."""
  state = tf.function(model.initialize_metrics_state).get_concrete_function()
  return tff.types.tensorflow_to_type(tf.nest.map_structure(
      tf.TensorSpec.from_tensor, state.structured_outputs))


def aggregate_metrics(metrics_aggregator: Optional[MetricsAggregator],
                      model: FunctionalModel, client_metrics):
  """The clients' training metrics, finalized at the server.

  Called in a federated context on `{unfinalized metrics}@CLIENTS`;
  `metrics_aggregator` defaults to `tff.learning.metrics.sum_then_finalize`.
  """
  metrics_aggregator = (metrics_aggregator or
                        tff.learning.metrics.sum_then_finalize)
  return metrics_aggregator(model.finalize_metrics)(client_metrics)


def release_no_metrics(metric_finalizers):
  """A `metrics_aggregator` that releases nothing: under DP, plain sums of
  the clients' training metrics would be unaccounted releases of their
  data. The round's `client_work/train` metrics are then empty."""
  del metric_finalizers

  def aggregate(client_metrics):
    del client_metrics
    return tff.federated_value(collections.OrderedDict(), tff.SERVER)

  return aggregate
