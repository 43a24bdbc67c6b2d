"""TFF type helpers shared by the tracer, the emitters and the cost model.

Tangents and cotangents have the same structure as the values they belong to
(names and Python containers included), so users see derivatives shaped like
their parameters. Non-float leaves (labels, counts) cannot carry a derivative;
their tangent is a *structural zero*: a float32 scalar (or a `[k]` vector with
`k` batched directions) that is always 0. That keeps every tangent a plain TFF
value while costing 4 bytes per non-float leaf.
"""

from typing import Callable, List, Optional

import numpy as np
import tensorflow_federated as tff

STRUCTURAL_ZERO_DTYPE = np.float32


def is_float_dtype(dtype) -> bool:
  return np.issubdtype(np.dtype(dtype), np.floating)


def map_tensor_types(
    fn: Callable[[tff.TensorType], tff.Type], type_spec: tff.Type
) -> tff.Type:
  """Maps `fn` over the tensor leaves of a (non-federated) TFF type.

  Names and Python container types of structures are preserved.
  """
  if isinstance(type_spec, tff.TensorType):
    return fn(type_spec)
  if isinstance(type_spec, tff.StructType):
    elements = [
        (name, map_tensor_types(fn, element))
        for name, element in tff.structure.iter_elements(type_spec)
    ]
    container = getattr(type_spec, 'python_container', None)
    if container is not None:
      return tff.StructWithPythonType(elements, container)
    return tff.StructType(elements)
  raise TypeError(f'Expected a tensor or structure type, found {type_spec}.')


def tensor_leaves(type_spec: tff.Type) -> List[tff.TensorType]:
  """The tensor leaves of `type_spec` in TFF's structure order."""
  if isinstance(type_spec, tff.TensorType):
    return [type_spec]
  if isinstance(type_spec, tff.StructType):
    leaves = []
    for _, element in tff.structure.iter_elements(type_spec):
      leaves.extend(tensor_leaves(element))
    return leaves
  raise TypeError(f'Expected a tensor or structure type, found {type_spec}.')


def has_float_leaf(type_spec: tff.Type) -> bool:
  """True when some leaf can carry a derivative; false for sequences."""
  if isinstance(type_spec, (tff.SequenceType, tff.FunctionType)):
    return False
  return any(is_float_dtype(t.dtype) for t in tensor_leaves(type_spec))


def non_float_leaves(type_spec: tff.Type) -> List[tff.TensorType]:
  return [t for t in tensor_leaves(type_spec) if not is_float_dtype(t.dtype)]


def tangent_type(
    type_spec: tff.Type, num_directions: Optional[int] = None
) -> tff.Type:
  """The type of a tangent (or cotangent) of a value of `type_spec`.

  Args:
    type_spec: A tensor or structure type (a federated type's member).
    num_directions: With `k` batched directions, every leaf gets a leading
      axis of size `k`.

  Returns:
    A type with the structure of `type_spec`; float leaves keep dtype and
    shape, non-float leaves become structural zeros.
  """
  batch = [] if num_directions is None else [num_directions]

  def leaf(t: tff.TensorType) -> tff.TensorType:
    if is_float_dtype(t.dtype):
      return tff.TensorType(t.dtype, batch + list(t.shape))
    return tff.TensorType(STRUCTURAL_ZERO_DTYPE, batch)

  return map_tensor_types(leaf, type_spec)


def federated_tangent_type(
    type_spec: tff.FederatedType, num_directions: Optional[int] = None
) -> tff.FederatedType:
  return tff.FederatedType(
      tangent_type(type_spec.member, num_directions),
      type_spec.placement,
      type_spec.all_equal,
  )


def num_elements(type_spec: tff.Type) -> int:
  """Number of scalar elements in a fully defined tensor/structure type."""
  total = 0
  for t in tensor_leaves(type_spec):
    if t.shape is None or any(d is None for d in t.shape):
      raise ValueError(
          f'{type_spec} has a tensor of unknown shape {t}; a fully defined '
          'shape is needed here.'
      )
    total += int(np.prod(t.shape, dtype=np.int64))
  return total


def num_bytes(type_spec: tff.Type) -> int:
  """Bytes needed to transmit one value of a fully defined type."""
  total = 0
  for t in tensor_leaves(type_spec):
    if t.shape is None or any(d is None for d in t.shape):
      raise ValueError(
          f'Cannot count the bytes of {type_spec}: tensor {t} has an unknown '
          'dimension.'
      )
    total += int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
  return total
