r"""Running computations on several TFF worker services.

TFF ships its C++ executor service in the tensorflow-federated wheel
(`tensorflow_federated/data/worker_binary --port=N`), and TFF's mergeable
execution context spreads one computation over several of them: it splits
the `CLIENTS`-placed arguments into one part per worker, runs the computation
up to its aggregation on each part, merges the partial aggregates and runs
the rest (the server update) once. tff_fad uses that machinery
(`tff.framework.MergeableCompExecutionContext` with TFF's own
`compile_to_mergeable_comp_form`); this module connects to the workers,
names them in errors, cuts computations of several aggregation layers into
stages, splits each argument's clients and gathers client-placed results
itself (TFF 0.87's splitter gives every worker the same clients when the
argument's last member is server-placed, and it concatenates client-placed
results in the order the workers finish).

Every computation can be spread over workers. One with a single layer of
aggregation (broadcast -> client work -> aggregation -> server work: one
round of FedAvg, BAFFLE, hypergradient FedAvg in forward mode) runs as TFF
runs it. One with several layers (a reverse-mode derivative, whose backward
sweep broadcasts the cotangent of an aggregate and aggregates again; a
program of several rounds; a Hessian-vector product) is cut into stages of
one layer each (`tff_fad.stages`); each stage is split over the workers and
merged, and the server values later stages need are carried between stages
through this process. Client values are not kept between stages: a stage
recomputes what it needs from the client data (sent to the workers once per
stage, as TFF does for any call), so a stateful `'reverse'` derivative runs
as `'reverse_recompute'` does. Secure sums cannot run on workers (only TFF's
test context runs them): invoking one raises `NotMergeableError`.
Computations without aggregation (initialization, `get_model_weights`) run on
one worker.

Trust boundary: TFF's workers serve unauthenticated, plaintext gRPC on all
interfaces (see `tff_fad.local_workers`). Workers on other machines run
behind a TLS front (`python -m tff_fad.local_workers serve`) and the driver
connects with `tls=tff_fad.worker_tls.WorkerTls(ca, cert, key)`: mutual TLS,
each side's certificate signed by the same CA. Without `tls`, non-loopback
addresses are refused unless `allow_remote=True`.

  with tff_fad.local_workers.LocalWorkers(2) as local:
    with tff_fad.workers.worker_context(local.addresses):
      state = process.next(state, client_data)   # split over 2 workers
"""

import asyncio
import contextlib
import logging
import threading
from typing import Any, Iterator, List, Optional, Sequence, Union

import grpc
import tensorflow_federated as tff

from tff_fad import local_workers
from tff_fad import runtime
from tff_fad import stages
from tff_fad import worker_tls
from tff_fad.core import transforms
# The steps of the mergeable context's invocation of one compiled form (merge,
# after-merge, repackaging), and its cardinality inference: private in TFF
# 0.87.
from tff_fad.core.tff_internals import cardinalities_utils
from tff_fad.core.tff_internals import mergeable_context as tff_mergeable
from tff_fad.local_workers import LocalWorkers
from tff_fad.local_workers import parse_addresses
from tff_fad.local_workers import TRUST_WARNING
from tff_fad.local_workers import WorkerError
from tff_fad.local_workers import WorkerRefusedError
from tff_fad.local_workers import WorkerUnavailableError
from tff_fad.worker_tls import WorkerTls

# gRPC codes that mean the worker went away (or restarted and lost its
# executors). TFF's context would retry these forever.
_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE,
                      grpc.StatusCode.FAILED_PRECONDITION)


class NotMergeableError(ValueError):
  """A computation cannot be split over several workers."""


class _DropUnretrievedWorkerErrors(logging.Filter):
  """Hides asyncio's 'Task exception was never retrieved' for worker errors.

  When a worker fails, TFF's mergeable context raises the first sub-round's
  error and never awaits the others; asyncio would later log their (same)
  worker errors as unretrieved, after the run has already reported one.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    exc_info = getattr(record, 'exc_info', None)
    return not (record.getMessage().startswith('Task exception was never')
                and exc_info and isinstance(exc_info[1], WorkerError))


logging.getLogger('asyncio').addFilter(_DropUnretrievedWorkerErrors())


# ---------------------------------------------------------------------------
# Contexts.


class _AddressedStub(tff.framework.RemoteExecutorStub):
  """TFF's gRPC stub, with failures that name the worker.

  TFF marks UNAVAILABLE as retryable and its execution context then retries
  the whole call forever: a dead worker would hang the run. Here it is an
  error naming the address, which the caller can act on (e.g. resume from the
  last saved state once the worker is back).
  """

  def __init__(self, address: str, channel: grpc.Channel):
    self._address = address
    self._stub = tff.framework.RemoteExecutorGrpcStub(channel)

  def _call(self, method: str, request):
    try:
      return getattr(self._stub, method)(request)
    except grpc.RpcError as e:
      code = e.code() if hasattr(e, 'code') else None
      details = e.details() if hasattr(e, 'details') else str(e)
      if code in _UNAVAILABLE_CODES:
        raise WorkerUnavailableError(
            self._address, f'stopped responding ({code.name}: {details}). '
            'Check that it is running and reachable.') from None
      raise WorkerError(self._address, f'{getattr(code, "name", code)}: '
                        f'{details}') from None

  def _named_errors(method: str):  # pylint: disable=no-self-argument
    return lambda self, request: self._call(method, request)  # pylint: disable=protected-access

  get_executor = _named_errors('get_executor')
  create_value = _named_errors('create_value')
  create_struct = _named_errors('create_struct')
  create_call = _named_errors('create_call')
  create_selection = _named_errors('create_selection')
  compute = _named_errors('compute')
  del _named_errors

  # Clean-up calls keep TFF's own errors: TFF catches those when it frees a
  # dead worker's values and executors.
  def dispose(self, request):
    return self._stub.dispose(request)

  def dispose_executor(self, request):
    return self._stub.dispose_executor(request)

  @property
  def is_ready(self) -> bool:
    return self._stub.is_ready


def _connect(address: str, timeout_seconds: float,
             tls: Optional[WorkerTls]) -> grpc.Channel:
  # gRPC would only report a channel that never becomes ready, after the
  # timeout; one handshake of our own says why a worker refuses us.
  host, port = local_workers.split_host_port(address)
  refusal = worker_tls.check_worker(host, port, tls, timeout_seconds)
  if refusal:
    raise WorkerRefusedError(address, refusal)
  if tls is None:
    channel = grpc.insecure_channel(address, runtime.GRPC_OPTIONS)
  else:
    channel = grpc.secure_channel(address, tls.channel_credentials(),
                                  runtime.GRPC_OPTIONS)
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout_seconds)
  except grpc.FutureTimeoutError:
    channel.close()
    raise WorkerUnavailableError(
        address, f'not reachable within {timeout_seconds:g} s. Start it '
        '(`worker_binary --port=N`, or `python -m tff_fad.local_workers`) or fix '
        'the address.') from None
  return channel


class _WorkerThreadContext(tff.framework.AsyncContext):
  """Runs one worker's TFF context on an event loop of its own.

  TFF 0.87's `RemoteExecutor` makes blocking gRPC calls inside its
  coroutines. Under one shared event loop, as the mergeable context runs its
  sub-rounds, worker 2 would wait for worker 1's whole computation: the split
  would run in sequence. A loop (thread) per worker lets them work at once.
  """

  def __init__(self, address: str, inner: tff.framework.AsyncContext):
    self._inner = inner
    self._loop = asyncio.new_event_loop()
    threading.Thread(target=self._loop.run_forever, daemon=True,
                     name=f'tff_fad worker {address}').start()

  async def invoke(self, comp, arg):
    future = asyncio.run_coroutine_threadsafe(self._inner.invoke(comp, arg),
                                              self._loop)
    return await asyncio.wrap_future(future)


def _async_worker_context(address: str, channel: grpc.Channel):
  stub = _AddressedStub(address, channel)

  def executor_stack(cardinalities):
    # Server-only computations (initialize, get_model_weights) carry no
    # CLIENTS cardinality; the C++ service requires one.
    cardinalities = dict(cardinalities)
    cardinalities.setdefault(tff.CLIENTS, 0)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return _WorkerThreadContext(address, tff.framework.AsyncExecutionContext(
      executor_fn=tff.framework.ResourceManagingExecutorFactory(executor_stack),
      compiler_fn=tff.backends.native.desugar_and_transform_to_native,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result))


def _compile_to_mergeable(comp):
  try:
    return tff.backends.native.compile_to_mergeable_comp_form(comp)
  except Exception as e:  # TFF raises several types for the same cause.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise NotMergeableError(
        'Cannot split this computation over several workers: one of its '
        'stages (broadcast -> client work -> aggregation -> server work) '
        'does not compile to TFF\'s mergeable form. Run it without workers. '
        f'Its type: {comp.type_signature.parameter} -> ... '
        f'(TFF: {type(e).__name__}: {reason[:300]})') from e


def _is_split_over_clients(type_spec: tff.Type) -> bool:
  return (isinstance(type_spec, tff.FederatedType)
          and type_spec.placement is tff.CLIENTS and not type_spec.all_equal)


def _split_clients(value: Any, type_spec: tff.Type,
                   num_parts: int) -> List[Any]:
  """`value` with its clients cut into consecutive parts, one per worker.

  Every `CLIENTS`-placed member is cut at the same client indices; all other
  members are repeated in each part. (TFF 0.87's own splitter takes the
  client index from the last member of a structure, so an argument whose
  last member is server-placed, such as a tangent or cotangent after the
  client data, gave every worker the first part of the clients.)
  """
  # Raises ValueError if the client-placed members disagree.
  num_clients = cardinalities_utils.infer_cardinalities(
      value, type_spec).get(tff.CLIENTS)
  if num_clients is None:
    return [value] * num_parts
  if num_clients == 0:
    return [value]
  num_parts = min(num_parts, num_clients)
  bounds = [num_clients * i // num_parts for i in range(num_parts + 1)]

  def part(v, t, start, stop):
    if isinstance(t, tff.StructType):
      elements = zip(tff.structure.iter_elements(
          tff.structure.from_container(v)), tff.structure.iter_elements(t))
      return tff.structure.Struct([(name, part(x, u, start, stop))
                                   for (_, x), (name, u) in elements])
    if _is_split_over_clients(t):
      return list(v)[start:stop]
    return v

  return [part(value, type_spec, a, b) for a, b in zip(bounds, bounds[1:])]


async def _invoke_form(form, parts: Sequence[Any],
                       contexts: Sequence[tff.framework.AsyncContext]):
  """Runs a mergeable form on the parts of its argument, one per context.

  As TFF's mergeable context, except that client-placed results come back in
  the order of the clients: TFF 0.87 concatenates the parts in the order the
  workers finish.
  """
  merged, merge_context = await tff_mergeable._invoke_merge_in_async_pool(  # pylint: disable=protected-access
      form, parts, contexts)
  result_type = form.after_merge.type_signature.result
  if not tff.types.contains(result_type, _is_split_over_clients):
    return await tff_mergeable._compute_after_merged(  # pylint: disable=protected-access
        form, parts[0], merged, merge_context)

  async def parts_on(i: int):
    # Context i runs parts i, i + len(contexts), ... in turn.
    return [await tff_mergeable._compute_after_merged(  # pylint: disable=protected-access
        form, parts[j], merged, contexts[i])
            for j in range(i, len(parts), len(contexts))]

  per_context = await asyncio.gather(
      *[parts_on(i) for i in range(min(len(contexts), len(parts)))])
  ordered = [None] * len(parts)
  for i, results in enumerate(per_context):
    ordered[i::len(contexts)] = results
  return tff_mergeable._repackage_partitioned_values(ordered, result_type)  # pylint: disable=protected-access


# A training run invokes a handful of computations (initialize, next,
# evaluation, get_model_weights); the oldest split is dropped beyond this.
_MAX_CACHED_SPLITS = 64


class _StagedWorkerContext(tff.framework.MergeableCompExecutionContext):
  """TFF's mergeable context, for computations of any number of stages.

  Each computation is cut at its aggregations (`tff_fad.stages`); each stage
  is split over the workers and merged as TFF does for a computation with one
  aggregation, and the server values later stages need are carried between
  them through the driver.
  """

  def __init__(self, async_contexts, num_subrounds: Optional[int]):
    super().__init__(async_contexts, compiler_fn=_compile_to_mergeable,
                     num_subrounds=num_subrounds)
    self._stages = {}

  def stages_of(self, comp: tff.Computation) -> List[stages.Stage]:
    # Computations compare by their proto; the type keeps the result's
    # Python containers apart.
    key = (comp, comp.type_signature)
    if key not in self._stages:
      secure = transforms.secure_intrinsics_used(comp)
      if secure:
        raise NotMergeableError(
            f'{secure[0]} cannot run on TFF workers: TFF\'s runtime '
            'does not implement secure sums (only its test context simulates '
            'them). Run without workers, inside '
            '`with tff_fad.secure_simulation_context():`.')
      try:
        split = stages.split_into_stages(comp)
      except Exception as e:  # TFF's compiler raises several types.
        raise NotMergeableError(
            'Cannot cut this computation into stages at its aggregations: '
            f'{type(e).__name__}: {str(e)[:300]}. Run it without workers. '
            f'Its type: {comp.type_signature}') from e
      if len(self._stages) >= _MAX_CACHED_SPLITS:
        self._stages.pop(next(iter(self._stages)))
      self._stages[key] = split
    return self._stages[key]

  def invoke(self, comp, arg=None):
    if isinstance(comp, tff_mergeable.MergeableCompForm):
      return self._invoke_stage(comp, arg)
    return stages.run_stages(self.stages_of(comp), arg, self._invoke_stage)

  def _invoke_stage(self, comp, arg):
    form = comp
    if isinstance(comp, tff.Computation):
      form = self._compiler_pipeline.compile(comp)
    contexts = self._async_execution_contexts
    if arg is None:
      parts = [None] * len(contexts)
    else:
      parts = _split_clients(arg, form.up_to_merge.type_signature.parameter,
                             self._num_subrounds)
    result = self._async_runner.run_coro_and_return_result(
        _invoke_form(form, parts, contexts))
    return tff.types.type_to_py_container(
        result, form.after_merge.type_signature.result)


def create_worker_context(
    addresses: Union[str, Sequence[str]], *, tls: Optional[WorkerTls] = None,
    allow_remote: bool = False, connect_timeout_seconds: float = 20.0,
    num_subrounds: Optional[int] = None,
) -> tff.framework.MergeableCompExecutionContext:
  """A TFF context that splits each computation's clients over workers.

  Args:
    addresses: `host:port` of running TFF worker services.
    tls: Connect with mutual TLS (workers behind `python -m
      tff_fad.local_workers serve`); any address is then accepted.
    allow_remote: Without `tls`, accept non-loopback addresses over
      plaintext (see the trust boundary in the module docstring).
    connect_timeout_seconds: How long to wait for each worker to answer.
    num_subrounds: Parts the clients are split into (default: one per
      worker; more parts than workers run in turn).

  Returns:
    A `tff.framework.MergeableCompExecutionContext`.

  Raises:
    ValueError: For bad addresses (see `parse_addresses`).
    WorkerUnavailableError: If a worker does not answer, naming it.
    WorkerRefusedError: If a worker refuses this driver (TLS: no
      certificate, an expired one, one of another CA; plaintext to a TLS
      worker) or its certificate does not verify, naming it and why.
  """
  addresses = parse_addresses(addresses,
                              allow_remote=allow_remote or tls is not None)
  contexts = [
      _async_worker_context(a, _connect(a, connect_timeout_seconds, tls))
      for a in addresses]
  return _StagedWorkerContext(contexts, num_subrounds=num_subrounds)


@contextlib.contextmanager
def worker_context(addresses: Union[str, Sequence[str]],
                   **kwargs) -> Iterator[None]:
  """Runs TFF computations in the block on the given workers.

  Args:
    addresses: As `create_worker_context`.
    **kwargs: Passed to `create_worker_context`.

  Yields:
    Nothing; the previous context is restored on exit.
  """
  context = create_worker_context(addresses, **kwargs)
  with tff.framework.get_context_stack().install(context):
    yield
