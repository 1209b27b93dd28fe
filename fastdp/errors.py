"""fastdp's exception types: every refusal made to protect the privacy guarantee is a
``PrivacyRefusal``, and its subclass names the cause.

``PrivacyRefusal`` derives from both ``ValueError`` and ``RuntimeError`` (the two types
fastdp raised before it had its own), so code that caught either keeps working; tests
assert the subclass and the cause in the message, never "some ValueError".

| type | raised when |
|---|---|
| ``UnsupportedModuleError`` | a module has no per-sample rule, or a setting it refuses |
| ``BatchMixingError`` | samples influence each other (batch statistics, mixing, a collate) |
| ``StateLeakError`` | state computed from the data would be released without noise (buffers) |
| ``LoopProtocolError`` | the training loop breaks the one-forward, one-backward, one-step rules |
| ``DistributedMismatchError`` | ranks disagree on a privacy fact |
| ``CheckpointError`` | a checkpoint is unsafe, corrupt or from another run |
"""

from __future__ import annotations


class PrivacyRefusal(ValueError, RuntimeError):
    """fastdp refused something that would break (or could not verify) the guarantee."""


class UnsupportedModuleError(PrivacyRefusal):
    """A trainable module fastdp has no exact per-sample rule for (or a setting it refuses)."""


class BatchMixingError(PrivacyRefusal):
    """One sample would move other samples' outputs or gradients."""


class StateLeakError(PrivacyRefusal):
    """State computed from the data would be released without clipping or noise."""


class LoopProtocolError(PrivacyRefusal):
    """The training loop broke a rule the step relies on (one forward and one backward per
    micro-batch, one ``step()`` per micro-batch, no reads of the sums inside backward)."""


class DistributedMismatchError(PrivacyRefusal):
    """Ranks of one run disagree on a privacy fact (clip norm, sigma, mode, sample rate...)."""


class CheckpointError(PrivacyRefusal):
    """A checkpoint is not safe to load, is corrupt, or belongs to a run with other facts."""


__all__ = [
    "PrivacyRefusal",
    "UnsupportedModuleError",
    "BatchMixingError",
    "StateLeakError",
    "LoopProtocolError",
    "DistributedMismatchError",
    "CheckpointError",
]
