"""`mode='auto'`: the accumulation mode that communicates least.

Every mode of a derivative program is built and measured with
`communication_cost` (the building blocks TFF will run), then ranked under a
`CostModel`: the estimated time one client spends communicating,

  round_trips * seconds_per_round_trip + bytes_per_client / bytes_per_second,

ties broken by fewer bytes. Round trips come first in practice (a round trip
waits for the slowest client; the defaults price one like 500 kB); bytes
decide when a mode must push one tangent per element of a large argument
(forward mode's gradient) or re-send what stateless clients forgot
(`reverse_recompute`). Local computation is not in the model.

`tff_fad.vjp`, `grad` and `value_and_grad` are the transforms of
`tff_fad.core.transforms` with `mode='auto'` added here: the transforms
build a program in a given mode, this module chooses among them.
"""

import dataclasses
import functools
from typing import Callable, Dict, Optional, Sequence, Union

from tff_fad.core import cost
from tff_fad.core import errors
from tff_fad.core import transforms

# The modes each transform can run in, in order of preference on a tie.
CANDIDATES = {
    'vjp': ('reverse', 'reverse_recompute'),
    'grad': ('forward', 'reverse', 'reverse_recompute'),
    'value_and_grad': ('forward', 'reverse', 'reverse_recompute'),
}


@dataclasses.dataclass(frozen=True)
class CostModel:
  """How `mode='auto'` weighs round trips against bytes.

  Attributes:
    seconds_per_round_trip: Latency of one wait for the clients.
    bytes_per_second: Each client's bandwidth (down and up alike).
  """

  seconds_per_round_trip: float = 0.5
  bytes_per_second: float = 1e6

  def __post_init__(self):
    for name in ('seconds_per_round_trip', 'bytes_per_second'):
      value = getattr(self, name)
      if not value > 0:
        raise ValueError(f'CostModel.{name} must be positive, got {value!r}.')

  def seconds(self, c: cost.CommunicationCost) -> float:
    per_client = (c.server_to_client_bytes_per_client +
                  c.client_to_server_bytes_per_client)
    return (c.round_trips * self.seconds_per_round_trip +
            per_client / self.bytes_per_second)


@dataclasses.dataclass(frozen=True)
class ModeChoice:
  """The chosen mode, with every candidate's cost (or why it cannot run).

  Attributes:
    mode: The chosen mode.
    costs: Per candidate mode, its `CommunicationCost`, or the reason the
      transform refused it.
    seconds: Per buildable mode, the cost model's estimate.
    cost_model: The `CostModel` used.
    programs: Per buildable mode, the derivative program itself.
  """

  mode: str
  costs: Dict[str, Union[cost.CommunicationCost, str]]
  seconds: Dict[str, float]
  cost_model: CostModel
  programs: Dict[str, object] = dataclasses.field(repr=False)

  def __str__(self):
    lines = [f'mode={self.mode!r} ({self.cost_model}):']
    for mode, c in self.costs.items():
      mark = '*' if mode == self.mode else ' '
      if isinstance(c, str):
        lines.append(f' {mark} {mode:18s} unavailable: {c}')
      else:
        lines.append(f' {mark} {mode:18s} ~{self.seconds[mode]:.3g} s/client: '
                     f'{c}')
    return '\n'.join(lines)


def choose_mode(comp, wrt=0, *, num_clients: int = 1,
                transform: str = 'value_and_grad', has_aux: bool = False,
                cost_model: Optional[CostModel] = None,
                candidates: Optional[Sequence[str]] = None) -> ModeChoice:
  """Builds `transform(comp, wrt)` in every mode and picks the cheapest.

  Args:
    comp: A tff_fad program.
    wrt: The argument(s) to differentiate.
    num_clients: Clients per run, for the totals in the report (the choice
      depends only on per-client figures).
    transform: 'vjp', 'grad' or 'value_and_grad'.
    has_aux: As for the transform.
    cost_model: A `CostModel`; the default prices a round trip like 500 kB.
    candidates: Modes to consider (default: every mode the transform has),
      e.g. `('forward', 'reverse_recompute')` for stateless clients.

  Returns:
    A `ModeChoice`; `str()` of it lists every candidate's cost.

  Raises:
    FederatedADError: if no candidate mode can be built (the reasons are in
      the message).
  """
  if transform not in CANDIDATES:
    raise errors.FederatedADError(
        f'choose_mode: transform must be one of {sorted(CANDIDATES)}, found '
        f'{transform!r}.')
  modes = CANDIDATES[transform] if candidates is None else tuple(candidates)
  unknown = [m for m in modes if m not in CANDIDATES[transform]]
  if unknown or not modes:
    raise errors.FederatedADError(
        f'choose_mode: candidates for {transform} must be a non-empty subset '
        f'of {CANDIDATES[transform]}, found {tuple(modes)}.')
  cost_model = cost_model or CostModel()
  build: Callable[..., object] = getattr(transforms, transform)
  costs, programs, seconds = {}, {}, {}
  for mode in modes:
    try:
      program = build(comp, wrt=wrt, mode=mode, has_aux=has_aux)
      measured = cost.communication_cost(program, num_clients)
    except errors.FederatedADError as e:
      costs[mode] = str(e)
      continue
    costs[mode], programs[mode] = measured, program
    seconds[mode] = cost_model.seconds(measured)
  if not programs:
    reasons = '; '.join(f'{m}: {r}' for m, r in costs.items())
    raise errors.FederatedADError(
        f'No mode can build {transform} of {getattr(comp, "__name__", comp)}:'
        f' {reasons}')

  def rank(mode):
    c = costs[mode]
    return (seconds[mode], c.server_to_client_bytes_per_client +
            c.client_to_server_bytes_per_client, modes.index(mode))

  chosen = min(programs, key=rank)
  return ModeChoice(chosen, costs, seconds, cost_model, programs)


def _with_auto(build: Callable[..., object]) -> Callable[..., object]:
  """`build` (a transform), also taking `mode='auto'`."""

  @functools.wraps(build)
  def transform(comp, wrt=0, mode: str = 'reverse', has_aux: bool = False):
    if mode == 'auto':
      choice = choose_mode(comp, wrt, transform=build.__name__,
                           has_aux=has_aux)
      return choice.programs[choice.mode]
    return build(comp, wrt=wrt, mode=mode, has_aux=has_aux)

  return transform


vjp = _with_auto(transforms.vjp)
grad = _with_auto(transforms.grad)
value_and_grad = _with_auto(transforms.value_and_grad)
