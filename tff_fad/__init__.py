"""tff_fad: Federated automatic differentiation for TensorFlow Federated."""

from tff_fad import runtime
