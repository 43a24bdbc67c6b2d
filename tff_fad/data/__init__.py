"""Datasets for tff_fad experiments: embedded offline digits and EMNIST."""

from tff_fad.data.digits import FederatedDigits
from tff_fad.data.digits import load_federated_digits
from tff_fad.data.digits import load_raw_digits
from tff_fad.data.emnist import EmnistUnavailableError
from tff_fad.data.emnist import load_emnist
