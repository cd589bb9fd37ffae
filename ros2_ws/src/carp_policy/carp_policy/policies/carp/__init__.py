"""CARP, the coarse-to-fine autoregressive policy: configuration_carp.py (config), tokenizer.py
(multi-scale action VQ-VAE), transformer.py (the coarse-to-fine GPT), modeling_carp.py (model +
policy), export_carp.py (its ONNX graphs), onnx_carp.py (how the engine runs them)."""

from carp_policy.policies.base import PolicyFamily as _Family
from carp_policy.policies.carp.configuration_carp import CarpConfig

FAMILY = _Family(
    name="carp",
    config_class=CarpConfig,
    modeling="carp_policy.policies.carp.modeling_carp",
    export="carp_policy.policies.carp.export_carp",
    onnx="carp_policy.policies.carp.onnx_carp",
)
