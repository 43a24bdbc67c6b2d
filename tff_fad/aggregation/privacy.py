"""Privacy accounting of a tff_fad program and its derivative programs.

Every aggregation of client data is a release, primal or derivative. The
releases of one run are read off the traced program and the accumulation
mode, with the same activity analysis the transforms use:

  mode                 releases per aggregation point of client data
  -------------------  --------------------------------------------------
  'primal'             the value
  'forward'            the value; the tangent too where the value depends
                       on `wrt` (DP factories: a second, separate release;
                       secure/plain sums: packed in the same message)
  'reverse', ...       the value (forward sweep); and one cotangent sum per
                       broadcast of a `wrt`-dependent value (its transpose)

Each DP release reports the `dp_accounting` event of its factory's DP query
(as tensorflow_privacy's queries do). The releases of one round share the
round's sample of clients, so a round is one Poisson-sampled mechanism: for
Gaussian mechanisms (sensitivity = clip, noise = z * clip each) releasing
them together is one Gaussian with `z_eff = (sum_j z_j**-2)**-1/2`. Rounds
compose; the RDP accountant turns that into (epsilon, delta). A release that
is not differentially private (a plain or secure sum of client data) makes
epsilon infinite; the report names it.
"""

import collections
import dataclasses
import math
from typing import Any, List, Optional, Sequence

import dp_accounting
import tensorflow as tf
import tensorflow_federated as tff

from tff_fad.aggregation import cotangent_sums
from tff_fad.aggregation import factory as factory_lib
from tff_fad.aggregation import secure_sum
from tff_fad.core import primitives
from tff_fad.core import transforms
from tff_fad.core import types as fad_types

PASSES = ('primal', 'forward', 'reverse', 'reverse_recompute')


@dataclasses.dataclass(frozen=True)
class Release:
  """One aggregation of client data in one run.

  Attributes:
    node: The program line, e.g. `v4 = aggregate_with_factory(v3, state)`.
    kind: 'value', 'tangent' or 'cotangent'.
    mechanism: 'dp', 'secure_sum' or 'plain'.
    event: The `dp_accounting.DpEvent` of a DP release, else None.
  """

  node: str
  kind: str
  mechanism: str
  event: Optional[dp_accounting.DpEvent] = None


def _to_float_event(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  """Replaces tensors in DP query events by Python floats."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return dp_accounting.GaussianDpEvent(float(event.noise_multiplier))
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent(
        [_to_float_event(e) for e in event.events])
  return event


def factory_dp_event(factory: Any, value_type: tff.Type
                     ) -> Optional[dp_accounting.DpEvent]:
  """The `dp_accounting` event one release of `factory` reports, or None.

  Args:
    factory: A `tff.aggregators` factory.
    value_type: The aggregated member type.

  Returns:
    The DP query's event (e.g. `GaussianDpEvent(z)`) for a
    `DifferentiallyPrivateFactory`, None for other factories.
  """
  if not isinstance(factory, tff.aggregators.DifferentiallyPrivateFactory):
    return None
  # The factory keeps its DP query private; asking the query for one noised
  # result is how tensorflow_privacy reports a release's event.
  query = factory._query
  specs = [tf.TensorSpec(t.shape, t.dtype)
           for t in fad_types.tensor_leaves(value_type)]
  global_state = query.initial_global_state()
  for template in (specs[0] if len(specs) == 1 else specs, specs):
    try:
      sample_state = query.initial_sample_state(template)
      _, _, event = query.get_noised_result(sample_state, global_state)
      return _to_float_event(event)
    except (ValueError, TypeError):
      continue
  raise ValueError(
      f'Cannot read the DP event of {factory!r} for values of type '
      f'{value_type}.')


def releases(comp: transforms.FederatedComputation, mode: str = 'primal',
             wrt: Any = 0, has_aux: bool = False) -> List[Release]:
  """The releases of client data in one run of `comp` or its derivative.

  Args:
    comp: A tff_fad `FederatedComputation`.
    mode: 'primal', or the accumulation mode of the derivative that runs
      ('forward' for jvp, 'reverse'/'reverse_recompute' for vjp/grad).
    wrt: The differentiated argument(s), as given to the transform.
    has_aux: As given to the transform: `comp` returns `(output, aux)` and
      only `output` is differentiated (forward mode then aggregates no
      tangent that only `aux` would need).

  Returns:
    One `Release` per aggregation of client data, in program order.
  """
  if mode not in PASSES:
    raise ValueError(f'mode must be one of {PASSES}, found {mode!r}.')
  program = comp.program
  if mode != 'primal':
    # A derivative the transform refuses to build releases nothing: say why.
    transforms.check_derivative(comp, wrt, mode, has_aux)
  # The transforms' own analysis, so the count matches what they emit.
  positions = [] if mode == 'primal' else transforms.resolve_wrt(
      program, wrt)
  active, nodes = transforms.derivative_activity(program, positions, mode,
                                                 has_aux)
  reverse = mode in cotangent_sums.REVERSE_MODES
  found = []
  for node in nodes:
    p = node.primitive
    line = node.describe()
    derivative = any(x in active for x in node.inputs)
    # Forward mode aggregates a tangent where the aggregate's tangent is
    # needed, which pruning may rule out although its inputs have one.
    tangent = mode == 'forward' and node.output in active
    if isinstance(p, factory_lib.FactoryAggregate):
      point = node.params['point']
      found.append(_factory_release(line, 'value', point.factory,
                                    point.value_type))
      if tangent:
        found.append(_factory_release(
            line, 'tangent', point.tangent_factory,
            fad_types.tangent_type(point.value_type, point.num_directions)))
    elif isinstance(p, secure_sum.SecureSum):
      found.append(Release(line, 'value', 'secure_sum'))
      if tangent:
        found.append(Release(line, 'tangent', 'secure_sum'))
    elif isinstance(p, primitives.Broadcast):
      if reverse and derivative:
        found.append(_cotangent_release(line, p, node))
    elif any(x.placement is tff.CLIENTS for x in node.inputs) and (
        node.output.placement is tff.SERVER):
      # federated_sum / mean / min / max / aggregate of client values.
      found.append(Release(line, 'value', 'plain'))
      if tangent:
        found.append(Release(line, 'tangent', 'plain'))
  return found


def factory_release(name: str, factory: Any, value_type: Any,
                    kind: str = 'value') -> Release:
  """The release of one aggregation of client data by a `tff.aggregators`
  factory outside a tff_fad program (e.g. a learning process's model update
  aggregator), for `privacy_report(..., extra_releases=...)`."""
  return _factory_release(name, kind, factory, tff.types.to_type(value_type))


def _factory_release(line, kind, factory, value_type) -> Release:
  event = factory_dp_event(factory, value_type)
  if event is not None:
    return Release(line, kind, 'dp', event)
  if isinstance(factory, tff.aggregators.SecureSumFactory):
    return Release(line, kind, 'secure_sum')
  return Release(line, kind, 'plain')


def _cotangent_release(line, primitive, node) -> Release:
  if not isinstance(primitive, cotangent_sums.PrivateBroadcast):
    return Release(line, 'cotangent', 'plain')
  merged = primitive.merged()
  factory = None if merged is None else merged.release_factory()
  if factory is None:
    # A secure cotangent sum (or one reverse mode refuses to emit).
    return Release(line, 'cotangent', 'secure_sum')
  return _factory_release(
      line, 'cotangent', factory,
      fad_types.tangent_type(node.inputs[0].member))


def _gaussian_multipliers(event) -> Optional[List[float]]:
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return [float(event.noise_multiplier)]
  if isinstance(event, dp_accounting.ComposedDpEvent):
    out = []
    for e in event.events:
      inner = _gaussian_multipliers(e)
      if inner is None:
        return None
      out.extend(inner)
    return out
  return None


def round_event(events: Sequence[dp_accounting.DpEvent],
                sampling_rate: float) -> dp_accounting.DpEvent:
  """One round's releases on one Poisson sample of clients, as one event."""
  multipliers = []
  for event in events:
    m = _gaussian_multipliers(event)
    if m is None:
      multipliers = None
      break
    multipliers.extend(m)
  if multipliers is not None:
    if any(z <= 0 for z in multipliers):
      inner = dp_accounting.NonPrivateDpEvent()
    else:
      inner = dp_accounting.GaussianDpEvent(
          sum(z**-2 for z in multipliers)**-0.5)
  else:
    inner = dp_accounting.ComposedDpEvent(list(events))
  if sampling_rate == 1.0:
    return inner
  return dp_accounting.PoissonSampledDpEvent(sampling_rate, inner)


@dataclasses.dataclass(frozen=True)
class PrivacyReport:
  """(epsilon, delta) of `rounds` runs of a program in one mode.

  Attributes:
    mode: 'primal', 'forward', 'reverse' or 'reverse_recompute'.
    releases: The releases of one round.
    sampling_rate: Poisson sampling rate of clients per round.
    rounds: Number of rounds.
    delta: Target delta.
    epsilon: Epsilon from the RDP accountant; inf if a release of client
      data is not DP (or has zero noise).
    effective_noise_multiplier: `z_eff` of one round (inf without DP
      releases, 0 if a release is not private).
  """

  mode: str
  releases: List[Release]
  sampling_rate: float
  rounds: int
  delta: float
  epsilon: float
  effective_noise_multiplier: float

  @property
  def dp_releases_per_round(self) -> int:
    return sum(r.mechanism == 'dp' for r in self.releases)

  @property
  def non_private_releases(self) -> List[Release]:
    return [r for r in self.releases if r.mechanism != 'dp']

  def summary(self, noise_multiplier: Optional[float] = None
              ) -> collections.OrderedDict:
    """The figures as a JSON-ready mapping (a run summary's `privacy`).

    Args:
      noise_multiplier: The one the run configured, reported beside the
        effective one.
    """
    return collections.OrderedDict(
        epsilon=self.epsilon, delta=self.delta,
        sampling_rate=self.sampling_rate, rounds=self.rounds,
        noise_multiplier=noise_multiplier,
        effective_noise_multiplier=self.effective_noise_multiplier,
        releases_per_round=[f'{r.kind} {r.mechanism}: {r.node}'
                            for r in self.releases])

  def __str__(self):
    lines = [
        f'privacy report ({self.mode}): {len(self.releases)} release(s) per '
        f'round, {self.dp_releases_per_round} DP',
    ]
    for r in self.releases:
      event = '' if r.event is None else f' {r.event}'
      lines.append(f'  {r.kind:9s} {r.mechanism:10s} {r.node}{event}')
    lines.append(
        f'  sampling rate {self.sampling_rate:g}, {self.rounds} rounds, '
        f'effective noise multiplier {self.effective_noise_multiplier:.4g}')
    if self.non_private_releases:
      lines.append(
          '  epsilon = inf: client data is released without DP by the '
          f'{len(self.non_private_releases)} non-DP release(s) above')
    lines.append(f'  (epsilon, delta) = ({self.epsilon:.4g}, {self.delta:g})')
    return '\n'.join(lines)


def privacy_report(comp: transforms.FederatedComputation, *,
                   sampling_rate: float, rounds: int, delta: float,
                   mode: str = 'primal', wrt: Any = 0, has_aux: bool = False,
                   extra_releases: Sequence[Release] = ()) -> PrivacyReport:
  """(epsilon, delta) for `rounds` runs of `comp` (or a derivative of it).

  Args:
    comp: A tff_fad `FederatedComputation`.
    sampling_rate: Probability that a client takes part in a round (Poisson
      sampling); 1.0 for every client every round.
    rounds: How many times the computation runs.
    delta: The target delta.
    mode: 'primal', 'forward', 'reverse' or 'reverse_recompute': which
      computation runs each round (the primal, a jvp, a vjp/grad).
    wrt: The differentiated argument(s).
    has_aux: As given to the transform (see `releases`).
    extra_releases: Releases of the same round made outside `comp` (see
      `factory_release`), accounted with it.

  Returns:
    A `PrivacyReport`.

  Raises:
    ValueError: for a sampling rate outside (0, 1], non-positive rounds or a
      delta outside (0, 1), or DP releases the RDP accountant cannot account
      (tree aggregation).
  """
  _check_accounting_args(sampling_rate, rounds, delta)
  return releases_report(
      releases(comp, mode, wrt, has_aux) + list(extra_releases),
      mode=mode, sampling_rate=sampling_rate, rounds=rounds, delta=delta)


def _check_accounting_args(sampling_rate, rounds, delta) -> None:
  if not 0 < sampling_rate <= 1:
    raise ValueError(f'sampling_rate must be in (0, 1], found {sampling_rate}.')
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    raise ValueError(f'rounds must be a positive int, found {rounds!r}.')
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), found {delta}.')


def releases_report(found: Sequence[Release], *, mode: str,
                    sampling_rate: float, rounds: int,
                    delta: float) -> PrivacyReport:
  """(epsilon, delta) of `rounds` rounds that each make the releases
  `found` (e.g. `factory_release`s of a process that is not a tff_fad
  program); `privacy_report` for the arguments and what it returns."""
  _check_accounting_args(sampling_rate, rounds, delta)
  found = list(found)
  events = [r.event for r in found if r.mechanism == 'dp']
  multipliers = []
  for event in events:
    multipliers.extend(_gaussian_multipliers(event) or [])
  z_eff = math.inf if not multipliers else (
      0.0 if min(multipliers) <= 0 else
      sum(z**-2 for z in multipliers)**-0.5)
  if any(r.mechanism != 'dp' for r in found) or z_eff == 0.0:
    epsilon = math.inf
  elif not events:
    epsilon = 0.0
  else:
    accountant = dp_accounting.rdp.RdpAccountant()
    event = round_event(events, sampling_rate)
    if not accountant.supports(event):
      unsupported = [r.node for r in found if r.mechanism == 'dp' and
                     not accountant.supports(r.event)]
      raise ValueError(
          f'The RDP accountant cannot account {event} (from {unsupported}): '
          'tree aggregation (DP-FTRL) releases are correlated across rounds '
          'and need their own accounting, e.g. dp_accounting\'s '
          'tree_aggregation_accountant.')
    accountant.compose(event, rounds)
    epsilon = accountant.get_epsilon(delta)
  return PrivacyReport(mode, found, sampling_rate, rounds, delta, epsilon,
                       z_eff)
