"""Errors of the hybrid strategy, each naming what went wrong and what to do."""


class HybridSGDError(RuntimeError):
    """Base class: a hybrid parameter-server run cannot go on."""


class PeerLostError(HybridSGDError):
    """A worker or the parameter server stopped answering or its connection closed."""


class ProtocolError(HybridSGDError):
    """A message broke the parameter-server protocol (wrong kind, size, dtype or version)."""


class NonFiniteGradientError(HybridSGDError):
    """A worker's gradient held NaN or Inf and the strategy's ``nonfinite`` policy is ``"stop"``."""


# what to do, on the rank whose gradient it was and on every other (told by the server)
NONFINITE_FIX = (
    "Lower the learning rate or check the data, then resume from the last checkpoint; nonfinite='skip' would skip "
    "such gradients and go on."
)
