"""Federated learning algorithms built on tff_fad."""

from tff_fad.learning.baffle import build_baffle
from tff_fad.learning.hypergradient_fed_avg import build_hypergradient_fed_avg
from tff_fad.learning.hypergradient_fed_avg import build_learned_weighting_fed_avg
from tff_fad.learning.models import FunctionalNet
from tff_fad.learning.models import get_net
from tff_fad.learning.models import lenet
from tff_fad.learning.models import linear
from tff_fad.learning.models import to_functional_model
from tff_fad.learning.models import wide_resnet
