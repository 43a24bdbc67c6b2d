"""Privacy-compatible aggregation: secure sums and tff.aggregators factories.

Their derivatives (tangents in forward mode, cotangent sums in reverse mode)
are aggregated as privately as the values.
"""

from tff_fad.aggregation.factory import aggregate_with_factory
from tff_fad.aggregation.factory import AggregateOutput
from tff_fad.aggregation.factory import AggregationPoint
from tff_fad.aggregation.privacy import factory_release
from tff_fad.aggregation.privacy import privacy_report
from tff_fad.aggregation.privacy import PrivacyReport
from tff_fad.aggregation.privacy import Release
from tff_fad.aggregation.privacy import releases
from tff_fad.aggregation.privacy import releases_report
from tff_fad.aggregation.secure_sum import federated_secure_sum
from tff_fad.aggregation.secure_sum import Quantizer
from tff_fad.aggregation.secure_sum import secure_simulation_context
