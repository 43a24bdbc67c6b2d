"""TensorFlow Federated's private modules: the one place tff_fad imports them.

Written for TFF 0.87.0 (`WRITTEN_FOR_TFF`). TFF 0.87 exposes its compiled
form (building blocks, intrinsic definitions, the call-dominant transform)
and the steps of its mergeable execution context only under
`tensorflow_federated.python`, which is not API and changes between
releases. tff_fad's uses of them (`tff_fad.core.cost`, `tff_fad.stages`,
`tff_fad.workers`) go through this module, which checks at import that
every name they use exists, so another TFF fails at once naming what moved
rather than deep inside a run; `tests/core/tff_internals_test.py` fails on
any other TFF version, to make whoever upgrades re-check these uses.
"""

import tensorflow_federated as tff
# pylint: disable=g-bad-import-order
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.compiler import intrinsic_defs
from tensorflow_federated.python.core.impl.compiler import transformation_utils
from tensorflow_federated.python.core.impl.compiler import transformations
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mergeable_context
from tensorflow_federated.python.core.impl.executors import cardinalities_utils
# pylint: enable=g-bad-import-order

WRITTEN_FOR_TFF = '0.87.0'

# Every private name tff_fad uses, by module.
USED = {
    building_blocks: ('Block', 'Call', 'ComputationBuildingBlock',
                      'Intrinsic', 'Lambda', 'Reference', 'Selection',
                      'Struct'),
    intrinsic_defs: ('get_aggregation_intrinsics',),
    transformation_utils: ('get_map_of_unbound_references',),
    transformations: ('to_call_dominant',),
    computation_impl: ('ConcreteComputation',),
    # The steps of one invocation of a compiled mergeable form, which
    # `tff_fad.workers` runs itself to fix how TFF 0.87 splits and gathers
    # clients; none is exported.
    mergeable_context: ('MergeableCompForm', '_invoke_merge_in_async_pool',
                        '_compute_after_merged',
                        '_repackage_partitioned_values'),
    cardinalities_utils: ('infer_cardinalities',),
}


def missing_names():
  """`module.name` of each used name the installed TFF lacks."""
  return [f'{module.__name__}.{name}' for module, names in USED.items()
          for name in names if not hasattr(module, name)]


_missing = missing_names()
if _missing:
  raise ImportError(
      f'tff_fad was written for TensorFlow Federated {WRITTEN_FOR_TFF}; the '
      f'installed {tff.__version__} lacks {", ".join(_missing)} (private TFF '
      'names used by tff_fad.core.tff_internals).')
