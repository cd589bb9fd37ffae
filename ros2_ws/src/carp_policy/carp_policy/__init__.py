"""carp_policy: learning for the CARP robot stack.

The policy families (``policies/``: CARP, DP-C), their shared observation encoders, normalisation
and processor, datasets, training, ONNX export and the onnxruntime engine. Importing the package is
cheap (no torch): ``carp_policy.actions``, ``carp_policy.dataset`` and the engine work on machines
without torch.
"""

from carp_policy.factory import load_policy

__all__ = ["load_policy"]
