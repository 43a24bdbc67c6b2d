"""TFF's standard tasks (`tff.simulation.baselines`) as functional models.

tff_fad's algorithms take `tff.learning.models.FunctionalModel`s only. This
module builds a task of `tff.simulation.baselines` (federated EMNIST,
CIFAR-100, Shakespeare, Stack Overflow) and converts the task's own Keras
model, loss and metrics into one, with the task's own client data and
preprocessing:

    task = load_baseline_task('emnist_character', epochs=1, batch_size=20,
                              max_elements=None, use_synthetic_data=True)
    batches = task.preprocess_train(
        task.train.create_tf_dataset_for_client(client_id), seed)

Batches are `(x, y)` tuples matching `task.model.input_spec`.

The conversion (`keras_to_functional`). Passing the task's Keras model to
`tff.learning.models.functional_model_from_keras` converts, but training fails
at run time with "You must feed a value for placeholder tensor 'conv2d_input'"
(EMNIST 'cnn_dropout'; 'embedding_input' for Shakespeare, 'input_1' for
Stack Overflow), in TFF's own FedAvg as in forward or reverse AD inside any
client loop. The cause: in every trace of
`predict_on_batch`, TFF re-creates the model with `tf.keras.models.clone_model`
(swapping the weight tensors in for variables) and then calls it on `x`. TFF
traces in a `tf.Graph`, so Keras is not "executing eagerly outside functions"
and builds the clone's layer graph the TF1 way: by calling every layer on a
real `tf.compat.v1.placeholder`, inside `predict_on_batch`'s graph. Those
build-time ops are dead code, and are normally pruned when the function runs,
unless one is stateful: Dropout, called there without `training`, emits a
`tf.cond` on the Keras learning phase whose branch draws random numbers, and
the LSTM emits stateful function calls. `tf.function`'s automatic control
dependencies make the function's outputs wait for every stateful op, so for
the forward functions of gradients and in `tf.data` reductions (the client
loops) the runtime must evaluate the unfed placeholder. (A plain session call
happens to rewrite it away, which is why a quick test can pass.) Models
without such layers (EMNIST 'cnn', '2nn') convert fine.

Fix 1: `functional_model_from_keras` is given a no-argument callable instead
of the model. Inside `predict_on_batch` it clones the model within a fresh
`FuncGraph` that is never run: the placeholders and build-time ops go there,
while variable requests still reach TFF's variable-creator scope (a FuncGraph
inherits it) and receive the weight tensors. The real call `model(x,
training)` then only runs the layers on `x`, with `training` passed explicitly,
so Dropout still drops in training passes. Called eagerly (where TFF reads
the initial weights) the callable returns the task's model itself, so the
initial weights are the task's, in the clones' variable order.

Fix 2 (forward mode): Keras' `Embedding` looks up with `tf.gather`, whose
gradient is an `IndexedSlices`; TF 2.14's `ForwardAccumulator` (which
transposes gradients) then fails inside a `tf.function` ("'IndexedSlices'
object has no attribute '_id'", or "'NoneType' object cannot be interpreted
as an integer"). The clones use `_GatherNdEmbedding`: the same rows via
`tf.gather_nd`, whose gradient is dense. Same weights, same outputs.

Batch normalization cannot be converted (its statistics are updated by
assignment); TFF's CIFAR-100 ResNets use group normalization, which converts.
"""

import collections
import dataclasses
import os
import urllib.error
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

TASK_NAMES = ('emnist_character', 'cifar100_image', 'shakespeare_character',
              'stackoverflow_word')

# task -> (default model id, all model ids that convert). TFF's Shakespeare
# and Stack Overflow word tasks have one model each (an LSTM) without an id;
# 'lstm' names it here. CIFAR-100's ResNets use group normalization (TFF's
# default), which converts; batch normalization would not.
MODEL_IDS = {
    'emnist_character': ('cnn_dropout', ('cnn_dropout', 'cnn', '2nn')),
    'cifar100_image': ('resnet18', ('resnet18', 'resnet34', 'resnet50',
                                    'resnet101', 'resnet152')),
    'shakespeare_character': ('lstm', ('lstm',)),
    'stackoverflow_word': ('lstm', ('lstm',)),
}

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.tff')

# The files TFF's loaders cache (decompressed) in the cache directory.
_CACHED_FILES = {
    'emnist_character': ('emnist_all.sqlite',),
    'cifar100_image': ('cifar100.sqlite',),
    'shakespeare_character': ('shakespeare.sqlite',),
    'stackoverflow_word': ('stackoverflow.sqlite',),
}

# The shuffle buffer each task's preprocessing uses by default (TFF's
# constants); `preprocess_train` shuffles with it, seeded.
_SHUFFLE_BUFFER = {
    'emnist_character': 418,       # emnist_preprocessing.MAX_CLIENT_DATASET_SIZE
    'cifar100_image': 500,         # ..._preprocessing.NUM_EXAMPLES_PER_CLIENT
    'shakespeare_character': 50,   # DEFAULT_SHUFFLE_BUFFER_SIZE
    'stackoverflow_word': 1000,    # constants.DEFAULT_SHUFFLE_BUFFER_SIZE
}

# Metrics TFF's `from_keras_model` adds to every model; tff_fad's algorithms
# count examples themselves and `loss` is added below.
_TFF_ADDED_METRICS = frozenset(
    {'_WeightedMeanLossMetric', 'NumExamplesCounter', 'NumBatchesCounter'})


class TaskDataUnavailableError(RuntimeError):
  """A task's data is neither cached nor downloadable; says how to fix it."""


@dataclasses.dataclass(frozen=True)
class BaselineTask:
  """A TFF baseline task with its model as a `FunctionalModel`.

  Attributes:
    name: One of `TASK_NAMES`.
    model_id: The model's id, one of `MODEL_IDS[name][1]`.
    model: The task's Keras model, loss and metrics as a functional model.
      Metrics: the task's own Keras metrics (TFF's example and batch
      counters dropped), then `loss`: the loss's Keras metric twin, the
      mean over all label elements (examples; tokens, padding included, for
      the sequence tasks, as in the loss). `input_spec` is an `(x, y)` tuple
      of `tf.TensorSpec`s.
    num_params: Number of scalar weights (trainable and non-trainable).
    train: Raw (unpreprocessed) training clients.
    test: Raw held-out test clients (the task's test split; for synthetic
      data TFF uses the same clients as `train`).
    preprocess_train: `(raw client dataset, seed) -> batches` per the client
      spec (epochs, max_elements, batch size), shuffled with a buffer of the
      task's default size, seeded by `seed`: the same seed gives the same
      batches. Elements are `(x, y)` tuples.
    preprocess_eval: `raw dataset -> batches` of `eval_batch_size`, one pass,
      not shuffled.
    note: Why the model differs from what was asked, or caveats; '' if none.
    keras_model: The task's Keras model (for inspection and
      `tff.learning.models.keras_model_from_functional_weights`).
  """
  name: str
  model_id: str
  model: tff.learning.models.FunctionalModel
  num_params: int
  train: tff.simulation.datasets.ClientData
  test: tff.simulation.datasets.ClientData
  preprocess_train: Callable[[tf.data.Dataset, int], tf.data.Dataset]
  preprocess_eval: Callable[[tf.data.Dataset], tf.data.Dataset]
  note: str = ''
  keras_model: Optional[tf.keras.Model] = None


def _create_tff_task(name: str, train_spec, eval_spec, model_id: str,
                     only_digits: bool, use_synthetic_data: bool,
                     cache_dir: Optional[str]):
  """The `tff.simulation.baselines.BaselineTask` of `name`."""
  baselines = tff.simulation.baselines
  common = dict(train_client_spec=train_spec, eval_client_spec=eval_spec,
                cache_dir=cache_dir, use_synthetic_data=use_synthetic_data)
  if name == 'emnist_character':
    return baselines.emnist.create_character_recognition_task(
        model_id=model_id, only_digits=only_digits, **common)
  if name == 'cifar100_image':
    # distort_train_images=False (TFF's default): random crops and flips
    # would not be seeded, and so not reproducible.
    return baselines.cifar100.create_image_classification_task(
        model_id=model_id, **common)
  if name == 'shakespeare_character':
    return baselines.shakespeare.create_character_prediction_task(**common)
  if name == 'stackoverflow_word':
    return baselines.stackoverflow.create_word_prediction_task(**common)
  raise ValueError(f'Unknown task {name!r}; one of {TASK_NAMES}.')


def _is_download_failure(e: BaseException) -> bool:
  if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
    return True
  # `tf.keras.utils.get_file` (Stack Overflow's word counts) re-raises
  # network errors as a bare Exception('URL fetch failure on ...').
  return type(e) is Exception and 'URL fetch failure' in str(e)


def _data_unavailable(name: str, cache_dir: str,
                      reason: Any) -> TaskDataUnavailableError:
  files = ', '.join(_CACHED_FILES[name])
  extra = ''
  if name == 'stackoverflow_word':
    extra = (' The vocabulary (stackoverflow.word_count) is cached by Keras '
             'in ~/.keras/datasets.')
  return TaskDataUnavailableError(
      f'Could not download the data of task {name!r} into {cache_dir} '
      f'({reason}). Run once with network access (TFF caches {files} in '
      f'{cache_dir}), or copy those files there from another machine.{extra} '
      'Or pass --use_synthetic_data for TFF\'s small synthetic clients '
      '(for testing only).')


def _loss_metric(loss_fn) -> tf.keras.metrics.Metric:
  config = loss_fn.get_config()
  if isinstance(loss_fn, tf.keras.losses.SparseCategoricalCrossentropy):
    return tf.keras.metrics.SparseCategoricalCrossentropy(
        name='loss', from_logits=config.get('from_logits', False))
  if isinstance(loss_fn, tf.keras.losses.CategoricalCrossentropy):
    return tf.keras.metrics.CategoricalCrossentropy(
        name='loss', from_logits=config.get('from_logits', False))
  raise TypeError(f'No loss metric for {type(loss_fn).__name__}.')


def metrics_constructors(variable_model) -> 'collections.OrderedDict':
  """name -> metric constructor: the task's Keras metrics, then `loss`.

  Args:
    variable_model: The task's `model_fn()` (TFF's Keras `VariableModel`).
  """
  constructors = collections.OrderedDict()
  for metric in variable_model._metrics:  # pylint: disable=protected-access
    if type(metric).__name__ in _TFF_ADDED_METRICS:
      continue
    config = metric.get_config()
    constructors[metric.name] = (
        lambda cls=type(metric), config=config: cls.from_config(config))
  loss_fn = variable_model._loss_fns[0]  # pylint: disable=protected-access
  constructors['loss'] = lambda: _loss_metric(loss_fn)
  return constructors


class _GatherNdEmbedding(tf.keras.layers.Embedding):
  """`Embedding` whose lookup has a dense gradient (same weights, outputs).

  Keras looks embeddings up with `tf.gather`, whose gradient is an
  `IndexedSlices`. TF 2.14's `ForwardAccumulator` computes JVPs by
  transposing gradients and fails on a gather inside a `tf.function` (as
  `predict_on_batch` is): "'IndexedSlices' object has no attribute '_id'".
  `tf.gather_nd` on `ids[..., None]` selects the same rows; its gradient is a
  dense `scatter_nd`, which forward mode handles.
  """

  def call(self, inputs):
    if inputs.dtype not in (tf.int32, tf.int64):
      inputs = tf.cast(inputs, tf.int32)
    out = tf.gather_nd(self.embeddings, inputs[..., tf.newaxis])
    if self.compute_dtype != out.dtype:
      out = tf.cast(out, self.compute_dtype)
    return out


def _clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
  """`clone_model`'s default clone, with dense-gradient embeddings."""
  if type(layer) is tf.keras.layers.Embedding:  # pylint: disable=unidiomatic-typecheck
    return _GatherNdEmbedding.from_config(layer.get_config())
  return layer.__class__.from_config(layer.get_config())


def keras_to_functional(keras_model: tf.keras.Model, loss_fn, input_spec,
                        metrics_constructor=None
                        ) -> tff.learning.models.FunctionalModel:
  """`functional_model_from_keras` that works under forward and reverse AD.

  See the module docstring. Differences from passing `keras_model` itself:
  the clone in every trace of `predict_on_batch` is built in a graph that is
  never run (so no build-time op on Keras's input placeholder is), and
  `Embedding` layers look up with `tf.gather_nd` (`_GatherNdEmbedding`).
  Initial weights are `keras_model`'s; weights, their order and outputs are
  the same.

  Raises:
    tff.learning.models.KerasFunctionalModelError: The model has batch
      normalization (its statistics cannot be updated functionally).
  """

  def clone() -> tf.keras.Model:
    return tf.keras.models.clone_model(keras_model, clone_function=_clone_layer)

  def build() -> tf.keras.Model:
    if tf.executing_eagerly():
      return keras_model  # Where TFF reads the initial weights.
    if not isinstance(tf.compat.v1.get_default_graph(),
                      tf.__internal__.FuncGraph):
      # TFF's conversion graph, where it creates and initializes variables.
      return clone()
    # Inside `predict_on_batch`: build the clone in a graph that is never
    # run. Variable requests still reach TFF's creator scope (a FuncGraph
    # inherits it) and get the weight tensors of `predict_on_batch`, which the
    # build graph captures; the real call `model(x, training)` then runs the
    # layers on x in `predict_on_batch`'s own graph.
    with tf.__internal__.FuncGraph('keras_model_build').as_default():
      return clone()

  for layer in keras_model.submodules:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
      raise tff.learning.models.KerasFunctionalModelError(
          'The model has batch normalization, which a FunctionalModel '
          'cannot update; use group normalization.')
  return tff.learning.models.functional_model_from_keras(
      build, loss_fn, input_spec, metrics_constructor)


def load_baseline_task(name: str, *, epochs: int, batch_size: int,
                       max_elements: Optional[int], use_synthetic_data: bool,
                       model_id: Optional[str] = None,
                       only_digits: bool = True, eval_batch_size: int = 64,
                       cache_dir: Optional[str] = None) -> BaselineTask:
  """A TFF baseline task with its model converted to a `FunctionalModel`.

  Args:
    name: One of `TASK_NAMES`.
    epochs: Local epochs over each client's data per round.
    batch_size: Client batch size.
    max_elements: At most this many raw elements per client per round (after
      repeating for `epochs`), or None for all.
    use_synthetic_data: TFF's small synthetic clients (offline, for tests)
      instead of the real data (downloaded once into `cache_dir`).
    model_id: One of `MODEL_IDS[name][1]`; None for the default.
    only_digits: EMNIST only: the 10 digit classes (True) or all 62. The
      synthetic EMNIST clients are the same either way; the model's output
      size follows `only_digits`.
    eval_batch_size: Batch size of `preprocess_eval`.
    cache_dir: Where TFF caches the real data; default `~/.tff`.

  Raises:
    ValueError: An unknown task or model id.
    TaskDataUnavailableError: The real data is not cached and cannot be
      downloaded; the message says how to get it.
  """
  if name not in TASK_NAMES:
    raise ValueError(f'Unknown task {name!r}; one of {TASK_NAMES}.')
  default_id, model_ids = MODEL_IDS[name]
  model_id = default_id if model_id is None else model_id
  if model_id not in model_ids:
    raise ValueError(f'Task {name!r} has the models {model_ids}, not '
                     f'{model_id!r}.')
  # TFF's own shuffle is off (buffer 1): it takes no seed. We shuffle the
  # raw client data first, seeded, with the task's default buffer.
  train_spec = tff.simulation.baselines.ClientSpec(
      num_epochs=epochs, batch_size=batch_size, max_elements=max_elements,
      shuffle_buffer_size=1)
  eval_spec = tff.simulation.baselines.ClientSpec(
      num_epochs=1, batch_size=eval_batch_size, shuffle_buffer_size=1)
  cache = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
  existed = {f: os.path.exists(os.path.join(cache, f))
             for f in _CACHED_FILES[name]}
  try:
    task = _create_tff_task(
        name, train_spec, eval_spec,
        model_id if name in ('emnist_character', 'cifar100_image') else None,
        only_digits, use_synthetic_data, cache_dir)
  except Exception as e:  # pylint: disable=broad-except
    if use_synthetic_data or not _is_download_failure(e):
      raise
    # TFF decompresses straight into the final path, so a failed download
    # would leave a truncated file that is trusted next time.
    for f, was_there in existed.items():
      path = os.path.join(cache, f)
      if not was_there and os.path.exists(path):
        os.remove(path)
    raise _data_unavailable(
        name, cache, getattr(e, 'reason', None) or e) from None

  variable_model = task.model_fn()
  keras_model = variable_model._keras_model  # pylint: disable=protected-access
  model = keras_to_functional(
      keras_model, variable_model._loss_fns[0],  # pylint: disable=protected-access
      task.datasets.element_type_structure,
      metrics_constructors(variable_model))
  num_params = int(sum(np.size(w) for w in tf.nest.flatten(
      model.initial_weights)))

  datasets = task.datasets
  buffer_size = _SHUFFLE_BUFFER[name]

  def preprocess_train(dataset: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    # reshuffle_each_iteration=False: with True, TF draws the order from a
    # seed generator whose state two datasets of the same seed can share, and
    # the same seed gave another order (a flaky test); a round makes a fresh
    # dataset with its own seed anyway, so only the epochs of one client's
    # round see the same order.
    dataset = dataset.shuffle(buffer_size, seed=seed,
                              reshuffle_each_iteration=False)
    return datasets.train_preprocess_fn(dataset)

  def preprocess_eval(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return datasets.eval_preprocess_fn(dataset)

  note = ''
  if name == 'emnist_character' and use_synthetic_data:
    note = ('Synthetic EMNIST has the same clients for only_digits True and '
            'False; only the output layer differs.')
  return BaselineTask(
      name=name, model_id=model_id, model=model, num_params=num_params,
      train=datasets.train_data, test=datasets.test_data,
      preprocess_train=preprocess_train, preprocess_eval=preprocess_eval,
      note=note, keras_model=keras_model)
