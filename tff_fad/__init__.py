"""tff_fad: federated automatic differentiation for TensorFlow Federated.

Write a federated program with tff_fad's primitives, then ask for its
derivative program: a native `tff.Computation` that uses only the same
federated primitives (broadcast, map/apply, sum, mean), so it runs on TFF's
runtime and composes with secure aggregation and differential privacy.
"""

from tff_fad import runtime
from tff_fad.core import communication_cost
from tff_fad.core import CommunicationCost
from tff_fad.core import federated_aggregate
from tff_fad.core import federated_apply
from tff_fad.core import federated_broadcast
from tff_fad.core import federated_computation
from tff_fad.core import federated_map
from tff_fad.core import federated_max
from tff_fad.core import federated_mean
from tff_fad.core import federated_min
from tff_fad.core import federated_sum
from tff_fad.core import FederatedADError
from tff_fad.core import FederatedComputation
from tff_fad.core import grad
from tff_fad.core import jvp
from tff_fad.core import LocalFunction
from tff_fad.core import MODES
from tff_fad.core import NotDifferentiableError
from tff_fad.core import PlacementError
from tff_fad.core import stop_gradient
from tff_fad.core import value_and_grad
from tff_fad.core import vjp
from tff_fad.core import with_derivatives

# Privacy-aware aggregation points, built on the core.
from tff_fad.aggregation import aggregate_with_factory
from tff_fad.aggregation import AggregateOutput
from tff_fad.aggregation import AggregationPoint
from tff_fad.aggregation import federated_secure_sum
from tff_fad.aggregation import privacy_report
from tff_fad.aggregation import PrivacyReport
from tff_fad.aggregation import secure_simulation_context

# Learning algorithms, built on both (tff_fad.learning.build_...).
from tff_fad import learning
