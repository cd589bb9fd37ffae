"""Shipped configs, the strict loader and the family registry.

Every shipped YAML loads through the registry, round-trips, lists only what differs from the
dataclass defaults, and resolves to the same config as before the families moved into
``policies/`` (``golden/configs_before_families.json``: the resolved configs of the old loader).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from carp_policy.policies import config_from_dict, families, get_family, load_config
from carp_policy.policies.base import CONFIG_DIR, PolicyConfig
from carp_policy.policies.carp.configuration_carp import CarpConfig
from carp_policy.yaml_config import load_yaml, save_yaml

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
BEFORE = json.loads((Path(__file__).parent / "golden" / "configs_before_families.json").read_text())
NEW_FIELDS = {"task", "dt", "execute_steps", "family"}  # the contract fields added with the families
# fields added after the golden was taken (tested where they act)
NEW_LEAVES = {
    "encoder.color_jitter",
    "encoder.obs_stride",
    "encoder.tasks",
    "encoder.trunk_stages",
    "transformer.aux_weight",
    "transformer.coarse_label_sigma",
    "transformer.coarse_decode",
    "transformer.coarse_head_weight",
    "transformer.coarse_head_anchor",
    "transformer.coarse_head_gripper",
}
# configs of families added after the golden: there is no old loader's resolution to hold them to
NEW_CONFIGS = {"coa_state_env", "coa_visual", "visual_head"}


def test_every_shipped_config_is_covered():
    assert SHIPPED == sorted({*BEFORE, *NEW_CONFIGS})


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    assert isinstance(cfg, get_family(cfg.family).config_class)
    assert config_from_dict(cfg.to_dict()) == cfg
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(type(cfg), tmp_path / "c.yaml") == cfg


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_lists_only_what_differs_from_the_defaults(name):
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    cls = get_family(raw.get("family", "carp")).config_class
    defaults = _leaves(cls().to_dict())
    same = [k for k, v in _leaves(raw).items() if k not in ("name", "family") and defaults[k] == v]
    assert not same, f"configs/{name}.yaml repeats defaults: {same}"


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_shipped_config_resolves_as_before(name):
    """Moving the defaults into the dataclasses changed no resolved value (the new contract fields
    aside, and DP-C's train.tokenizer_lr, which DP-C never reads: it has no tokenizer stage)."""
    now = _leaves({k: v for k, v in load_config(name).to_dict().items() if k not in NEW_FIELDS})
    now = {k: v for k, v in now.items() if k not in NEW_LEAVES}
    before = _leaves({k: v for k, v in BEFORE[name].items() if k not in NEW_FIELDS})
    if name.startswith("diffusion"):
        now.pop("train.tokenizer_lr"), before.pop("train.tokenizer_lr")
    assert now == before


def test_defaults_are_the_state_config():
    assert load_config("state") == CarpConfig(name="carp_state")


def test_registry_names_the_families():
    assert families() == ["carp", "coa", "diffusion"]
    for name in families():
        fam = get_family(name)
        assert issubclass(fam.config_class, PolicyConfig) and fam.config_class.FAMILY == name
        assert fam.config_class().family == name
    with pytest.raises(ValueError, match=r"unknown policy family 'act' \(known: carp, coa, diffusion\)"):
        get_family("act")
    with pytest.raises(ValueError, match="unknown policy family 'act'"):
        config_from_dict({"family": "act"})
    assert isinstance(config_from_dict({}), CarpConfig)  # configs written before `family` existed


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config("diffusion_state", ["unet.down_dims=[64, 128, 256]", "train.policy_steps=7"])
    assert cfg.unet.down_dims == (64, 128, 256) and cfg.train.policy_steps == 7
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in section 'unet': \['bogus'\]"):
        load_config("diffusion_state", ["unet.bogus=1"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in CarpConfig: \['tokeniser'\]"):
        config_from_dict({"tokeniser": {}})
    with pytest.raises(ValueError, match="family must be 'carp'"):
        CarpConfig(family="diffusion")
    with pytest.raises(ValueError, match=r"execute_steps must be in 1..16"):
        CarpConfig(execute_steps=17)


def test_every_field_is_documented():
    """Each config field carries a comment with its meaning (configuration files are documentation)."""
    import inspect

    from carp_policy.policies import base
    from carp_policy.policies.carp import configuration_carp
    from carp_policy.policies.coa import configuration_coa
    from carp_policy.policies.diffusion import configuration_diffusion

    for module in (base, configuration_carp, configuration_coa, configuration_diffusion):
        src = inspect.getsource(module).splitlines()
        for obj in vars(module).values():
            if not (
                isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
            ):
                continue
            body = inspect.getsource(obj).splitlines()
            for f in dataclasses.fields(obj):
                lines = [i for i, line in enumerate(body) if line.strip().startswith(f"{f.name}:")]
                if not lines:
                    continue  # inherited, documented where it is declared
                i = lines[0]
                assert "#" in body[i] or body[i - 1].strip().startswith("#"), (obj.__name__, f.name)
        assert src


def test_a_new_family_is_one_registration(monkeypatch):
    """A family the stack has never seen (a config subclass + its module names) is found by name by
    every loader: nothing else changes."""
    from dataclasses import dataclass

    from carp_policy import policies
    from carp_policy.policies import PolicyFamily, register

    @dataclass
    class ToyConfig(PolicyConfig):
        FAMILY = "toy"
        keyframes: int = 3  # a field of its own

        @property
        def horizon(self) -> int:
            return 16

    monkeypatch.setattr(policies, "_FAMILIES", dict(policies._FAMILIES))
    register(PolicyFamily("toy", ToyConfig, "toy.modeling", "toy.export", "toy.onnx"))
    assert "toy" in families()
    cfg = config_from_dict({"family": "toy", "keyframes": 5, "train": {"policy_steps": 9}})
    assert isinstance(cfg, ToyConfig) and cfg.keyframes == 5 and cfg.train.policy_steps == 9
    assert cfg.contract()["horizon"] == 16
    with pytest.raises(ValueError, match="already registered"):
        register(PolicyFamily("toy", CarpConfig, "a", "b", "c"))
