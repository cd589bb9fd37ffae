"""Chain-of-Action (CoA, Zhang et al. 2025), the second family: configuration_coa.py (config),
chain.py (keyframes, the stop rule, chain -> chunk; numpy), modeling_coa.py (model + policy),
export_coa.py / onnx_coa.py (the KV-cached ONNX graphs and how the engine runs them)."""

from carp_policy.policies.base import PolicyFamily as _Family
from carp_policy.policies.coa.configuration_coa import CoaConfig

FAMILY = _Family(
    name="coa",
    config_class=CoaConfig,
    modeling="carp_policy.policies.coa.modeling_coa",
    export="carp_policy.policies.coa.export_coa",
    onnx="carp_policy.policies.coa.onnx_coa",
)
