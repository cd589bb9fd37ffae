"""Chain-of-Action's ONNX graphs (the authors' code has no export and no KV cache):

    coa_obs.onnx   state, image_<cam>                      -> cond, action, present_k, present_v
                   (observation encoder + chain step 0: the keyframe, and the cache after it)
    coa_step.onnx  cond, action_in, pos, past_k, past_v    -> action, present_k, present_v
                   (one chain step at position pos from the previous step; the cache has the fixed
                    length chain.max_len, written at pos, later slots masked)

Both run ``CoaModel.first_step`` / ``next_step``, the steps the torch policy runs. The step graph
is one graph for every position because its shapes do not change with pos; the engine runs it in a
loop with the stop rule in numpy (onnx_coa.py, chain.py). Batch 1: the chain's length is per
observation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class _CoaObsGraph(nn.Module):
    """Observation encoder + the keyframe step (see the module docstring)."""

    def __init__(self, model: nn.Module, cameras: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.cameras = model, cameras

    def forward(self, state: torch.Tensor, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cond = self.model.encode_obs(state, dict(zip(self.cameras, images)))  # (1, E)
        action, k, v = self.model.first_step(cond)
        return cond, action, k, v


class _CoaStepGraph(nn.Module):
    """One KV-cached chain step (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, cond, action_in, pos, past_k, past_v) -> tuple[torch.Tensor, ...]:
        return self.model.next_step(cond, action_in, pos, past_k, past_v)


def default_batch(config: Any) -> int:
    """One chain per run: its length depends on the observation."""
    return 1


def check_batch(batch: int) -> None:
    if batch != 1:
        raise ValueError(f"batch must be 1 for Chain-of-Action (one chain per run); got {batch}")


def export_graphs(policy: Any, spec: dict[str, Any], out: Path, batch: int) -> tuple[list[dict], dict]:
    """The two graphs of a ``CoaPolicy`` -> (manifest entries, {"chain": ...})."""
    from carp_policy.export import example_inputs, export_graph

    check_batch(batch)
    model = policy.model.float().cpu().eval()
    cams = tuple(spec["cameras"])
    obs_args, obs_names = example_inputs(spec)
    kv = ["present_k", "present_v"]
    e1 = export_graph(
        _CoaObsGraph(model, cams), tuple(obs_args), obs_names, ["cond", "action", *kv], out / "coa_obs.onnx"
    )
    e1["stage"] = "encoder + keyframe"
    past_k, past_v = model.decoder.empty_cache(1)
    args = (
        torch.zeros(1, model.cfg.encoder.out_dim),
        torch.zeros(1, model.action_dim),
        torch.ones(1, dtype=torch.int64),
        past_k,
        past_v,
    )
    e2 = export_graph(
        _CoaStepGraph(model), args, ["cond", "action_in", "pos", "past_k", "past_v"], ["action", *kv],
        out / "coa_step.onnx",
    )  # fmt: skip
    e2["stage"] = "chain steps"
    return [e1, e2], {"chain": {"max_len": model.cfg.chain.max_len, "cache": list(past_k.shape)}}


def parity_sampler(config: Any) -> str:
    """What the parity check compares: the greedy chains, stopped by the same rule."""
    return "greedy chain, dynamic stop"


def parity_pair(policy: Any, engine: Any, obs: Any, i: int) -> tuple[np.ndarray, np.ndarray, None]:
    """Torch vs ONNX chunk of one observation (same stop rule; a different chain length would show
    as a large action difference)."""
    return policy.predict(obs).actions, engine.predict(obs).actions, None
