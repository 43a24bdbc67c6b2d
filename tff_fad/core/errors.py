"""Exceptions raised by tff_fad's federated AD core.

Every error names the offending primitive, argument or type, so a user can
find the line of their program that caused it.
"""


class FederatedADError(ValueError):
  """Base class for errors in building or transforming a tff_fad program."""


class PlacementError(FederatedADError):
  """A federated value has the wrong placement for the primitive it is given to."""


class NotDifferentiableError(FederatedADError):
  """A derivative was requested through something that has no derivative rule.

  Raised at transform time (by `jvp`, `vjp`, `grad`, `value_and_grad`), never
  when the primal program runs.
  """


class ZeroDerivativeWarning(UserWarning):
  """A local function's derivative path goes through an op with no derivative.

  E.g. `tf.argmax` or a cast to an integer on the way from a differentiated
  input to a float output: TF treats the derivative through it as zero, so
  the derivative program runs but misses that path. Warned when the
  derivative program is built.
  """
