"""carp_policy: learning for the CARP robot stack.

The CARP tokenizer and transformer, observation encoders, datasets, training, ONNX export and the
onnxruntime engine, and the policy families (CARP, DP-C). Importing the package is cheap (no torch):
``carp_policy.actions`` and ``carp_policy.dataset`` work on machines without torch.
"""

from carp_policy.factory import load_policy

__all__ = ["load_policy"]
