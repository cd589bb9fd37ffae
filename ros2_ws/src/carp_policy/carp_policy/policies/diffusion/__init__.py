"""Diffusion Policy (DP-C), the baseline: configuration_diffusion.py (config), unet.py (temporal
U-Net), modeling_diffusion.py (model + policy), export_diffusion.py / onnx_diffusion.py (ONNX
graphs and how the engine runs them)."""

from carp_policy.policies.base import PolicyFamily as _Family
from carp_policy.policies.diffusion.configuration_diffusion import DiffusionConfig

FAMILY = _Family(
    name="diffusion",
    config_class=DiffusionConfig,
    modeling="carp_policy.policies.diffusion.modeling_diffusion",
    export="carp_policy.policies.diffusion.export_diffusion",
    onnx="carp_policy.policies.diffusion.onnx_diffusion",
)
