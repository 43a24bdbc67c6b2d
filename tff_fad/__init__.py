"""tff_fad: federated automatic differentiation for TensorFlow Federated.

Write a federated program with tff_fad's primitives, then ask for its
derivative program: a native `tff.Computation` that uses only the same
federated primitives (broadcast, map/apply, sum, mean), so it runs on TFF's
runtime and composes with secure aggregation and differential privacy.

The names below load their modules (and TensorFlow) on first use, so light
entry points such as `python -m tff_fad.local_workers` start at once.
Importing `tff_fad` registers the clean-up of TFF's leaked local worker at
exit (`tff_fad.runtime`).
"""

import importlib
from typing import Any, List

from tff_fad import runtime

# Public name -> the module that defines it.
_CORE = (
    'choose_mode', 'communication_cost', 'CommunicationCost', 'CostModel',
    'federated_aggregate',
    'federated_apply', 'federated_broadcast', 'federated_computation',
    'federated_map', 'federated_max', 'federated_mean', 'federated_min',
    'federated_sum', 'FederatedADError', 'FederatedComputation', 'grad',
    'jvp', 'LocalFunction', 'ModeChoice', 'MODES', 'NotDifferentiableError',
    'PlacementError', 'seeded_direction', 'seeded_tangents', 'stop_gradient',
    'value_and_grad', 'vjp',
    'with_derivatives', 'ZeroDerivativeWarning')
# Privacy-aware aggregation points, built on the core.
_AGGREGATION = (
    'aggregate_with_factory', 'AggregateOutput', 'AggregationPoint',
    'federated_secure_sum', 'privacy_report', 'PrivacyReport',
    'secure_simulation_context')
_EXPORTS = {
    **{name: 'tff_fad.core' for name in _CORE},
    **{name: 'tff_fad.aggregation' for name in _AGGREGATION},
}
# Subpackages: learning algorithms (tff_fad.learning.build_...), data, and
# execution on several TFF workers (computations cut into stages).
_SUBMODULES = ('aggregation', 'core', 'data', 'learning', 'local_workers',
               'served_workers', 'stages', 'worker_tls', 'workers')


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    value = importlib.import_module(f'tff_fad.{name}')
  elif name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    raise AttributeError(f'module tff_fad has no attribute {name!r}')
  globals()[name] = value  # Later lookups skip __getattr__.
  return value


def __dir__() -> List[str]:
  return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


__all__ = sorted(set(_EXPORTS) | set(_SUBMODULES) | {'runtime'})
