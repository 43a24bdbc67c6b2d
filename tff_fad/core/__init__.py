"""The federated AD core: primitives, traced programs and their transforms."""

from tff_fad.core.cost import communication_cost
from tff_fad.core.cost import CommunicationCost
from tff_fad.core.errors import FederatedADError
from tff_fad.core.errors import NotDifferentiableError
from tff_fad.core.errors import PlacementError
from tff_fad.core.local_ad import LocalFunction
from tff_fad.core.local_ad import with_derivatives
from tff_fad.core.primitives import federated_aggregate
from tff_fad.core.primitives import federated_apply
from tff_fad.core.primitives import federated_broadcast
from tff_fad.core.primitives import federated_map
from tff_fad.core.primitives import federated_max
from tff_fad.core.primitives import federated_mean
from tff_fad.core.primitives import federated_min
from tff_fad.core.primitives import federated_sum
from tff_fad.core.primitives import stop_gradient
from tff_fad.core.transforms import federated_computation
from tff_fad.core.transforms import FederatedComputation
from tff_fad.core.transforms import grad
from tff_fad.core.transforms import jvp
from tff_fad.core.transforms import MODES
from tff_fad.core.transforms import value_and_grad
from tff_fad.core.transforms import vjp
