"""Privacy-compatible aggregation: secure sums and tff.aggregators factories.

Their derivatives (tangents in forward mode, cotangent sums in reverse mode)
are aggregated as privately as the values.
"""

from tff_fad.aggregation.secure_sum import federated_secure_sum
from tff_fad.aggregation.secure_sum import Quantizer
from tff_fad.aggregation.secure_sum import secure_simulation_context
