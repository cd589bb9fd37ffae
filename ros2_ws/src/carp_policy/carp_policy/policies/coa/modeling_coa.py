"""Chain-of-Action (Zhang et al. 2025): a trajectory decoded backwards from a keyframe, and its policy.

The network: the shared observation encoder (state MLP, or ResNet per camera + proprioception) gives
the condition; a causal decoder runs over [start; keyframe; ...; current], each token the linear
embedding of the previous chain step (continuous actions, no quantisation), and predicts the next
step with ``predict_ahead`` heads (step i, i+1, ...). Its blocks are CARP's (adaptive LayerNorm on
the condition, transformer.py's ``AdaLNBlock``): our encoders summarise an observation in one vector,
and with one memory token, ACT-style cross-attention is a conditioning like this one.

Training (``loss``): for each window, the keyframe (chain.py), the reversed chain and its mask;
L1 on every head's step, plus the latent consistency loss (L1 between the decoder's output latent at
step i and the embedding of the true step i, the next input; the target's gradient is stopped).

Inference (``generate``, the engine the same): the keyframe first, then one KV-cached step per chain
step until ``ChainStop`` says the chain is back at the current pose; the chain, flipped forward,
is the chunk. The cache has a fixed length L (written at ``pos``, later slots masked), so one
static step graph serves every position (export_coa.py).

Shapes: B batch, L = chain.max_len, D = 10, n = decoder width, E = observation embedding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carp_policy.encoders import build_encoder
from carp_policy.normalization import Normalizer
from carp_policy.policies.carp.configuration_carp import TransformerConfig
from carp_policy.policies.carp.modeling_carp import TorchRunner, count_parameters
from carp_policy.policies.carp.transformer import AdaLNBlock, CarpTransformer
from carp_policy.policies.coa.chain import ChainStop, chain_to_chunk, keyframe_offsets, reverse_chains
from carp_policy.policies.coa.configuration_coa import CoaConfig
from carp_policy.policies.policy import ChunkPolicy


def cached_block(
    blk: AdaLNBlock,
    x: torch.Tensor,
    cond: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    write: torch.Tensor,
    visible: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``AdaLNBlock`` on one new token against a fixed-length cache (the same weights and arithmetic
    as its masked forward). x (B, 1, n); past_k/v (B, nh, L, hd); write (1, 1, L, 1) marks the new
    token's slot, visible (1, 1, 1, L) the slots it may attend to. -> x, present_k/v (B, nh, L, hd)."""
    att_m = blk.attn
    B, T, C = x.shape
    nh = att_m.heads
    sh1, sc1, g1, sh2, sc2, g2 = blk.ada(cond).unsqueeze(1).chunk(6, dim=-1)  # each (B, 1, n)
    q, k, v = att_m.qkv(blk.ln1(x) * (1 + sc1) + sh1).split(C, dim=2)
    q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, 1, hd)
    k = torch.where(write, k.view(B, T, nh, C // nh).transpose(1, 2), past_k)  # (B, nh, L, hd)
    v = torch.where(write, v.view(B, T, nh, C // nh).transpose(1, 2), past_v)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // nh))  # (B, nh, 1, L)
    att = att.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    y = att_m.proj((att @ v).transpose(1, 2).reshape(B, T, C))
    x = x + g1 * y
    x = x + g2 * blk.mlp(blk.ln2(x) * (1 + sc2) + sh2)
    return x, k, v


class ChainDecoder(nn.Module):
    """Causal decoder over a chain of continuous actions, conditioned on the observation."""

    def __init__(self, cfg: CoaConfig) -> None:
        super().__init__()
        d = cfg.decoder
        n, L, D, E = d.width, cfg.chain.max_len, cfg.action_dim, cfg.encoder.out_dim
        self.L, self.D, self.P = L, D, d.predict_ahead
        self.heads_, self.head_dim, self.depth = d.heads, n // d.heads, d.depth
        tcfg = TransformerConfig(
            depth=d.depth, width=n, heads=d.heads, mlp_ratio=d.mlp_ratio, dropout=d.dropout
        )
        self.start = nn.Linear(E, n)  # observation -> the start token (its bias: the learned start)
        self.action_in = nn.Linear(D, n)  # chain step -> the next token
        self.pos_embed = nn.Embedding(L, n)
        self.blocks = nn.ModuleList(AdaLNBlock(tcfg, E) for _ in range(d.depth))
        self.ln_f = nn.LayerNorm(n, elementwise_affine=False)
        self.ada_f = nn.Sequential(nn.SiLU(), nn.Linear(E, 2 * n))
        self.head = nn.Linear(n, self.P * D)  # the multi-token heads, as one linear
        self.register_buffer("causal", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        self.register_buffer("slots", torch.arange(L), persistent=False)
        self.apply(CarpTransformer._init)  # CARP's init: N(0, 0.02), zero-initialised adaLN gates

    def latent(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, T, n) -> the output latent (B, T, n): the final norm, modulated by the condition."""
        shift, scale = self.ada_f(cond).unsqueeze(1).chunk(2, dim=-1)
        return self.ln_f(x) * (1 + scale) + shift

    def forward(self, cond: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. cond (B, E), chain (B, L, D) normalised, keyframe first.
        -> predictions (B, L, P, D) (position i, head p: chain step i + p) and latents (B, L, n)."""
        B, L, _ = chain.shape
        x = torch.cat([self.start(cond)[:, None], self.action_in(chain[:, :-1])], dim=1)  # (B, L, n)
        x = x + self.pos_embed(self.slots[:L])
        for blk in self.blocks:
            x, _, _ = blk(x, cond, self.causal[:L, :L])
        h = self.latent(x, cond)
        return self.head(h).view(B, L, self.P, self.D), h

    def empty_cache(
        self, batch: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values before the first step: two (depth, B, heads, L, head_dim) zero tensors."""
        shape = (self.depth, batch, self.heads_, self.L, self.head_dim)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def step(
        self,
        token: torch.Tensor,
        cond: torch.Tensor,
        pos: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chain step with the KV cache: token (B, n) at position pos ((1,) int64) -> the next
        step (B, D) (head 0) and present_k/v (depth, B, heads, L, head_dim). Shapes are the same at
        every position (no Python control flow on data): one exported graph serves all of them."""
        x = (token + self.pos_embed(pos))[:, None]  # (B, 1, n)
        write = (self.slots == pos)[None, None, :, None]  # (1, 1, L, 1)
        visible = (self.slots <= pos)[None, None, None, :]  # (1, 1, 1, L)
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):  # static loop over depth
            x, k, v = cached_block(blk, x, cond, past_k[i], past_v[i], write, visible)
            ks.append(k)
            vs.append(v)
        out = self.head(self.latent(x, cond))[:, 0, : self.D]  # (B, D): head 0, the next step
        return out, torch.stack(ks), torch.stack(vs)


class CoaModel(nn.Module):
    """Observation encoder + chain decoder: everything a CoA checkpoint holds."""

    stages = ("policy",)  # carp-train's stages (no tokenizer)
    policy_log_fields = ("l1", "latent", "chain_len")

    def __init__(self, cfg: CoaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.horizon, self.action_dim = cfg.horizon, cfg.action_dim
        self.encoder = build_encoder(cfg.encoder)
        self.decoder = ChainDecoder(cfg)
        # metres (and gripper metres) per normalised action unit: keyframes and the stop rule are
        # physical. Set from the run's normalizer (``set_normalizer``); not part of the weights.
        self.register_buffer("action_scale", torch.ones(cfg.action_dim), persistent=False)

    def set_normalizer(self, normalizer: Normalizer) -> CoaModel:
        """Take the action scale of the normalizer the windows are normalised with."""
        scale, _ = normalizer._params("action", self.action_scale)
        self.action_scale.copy_(scale)
        return self

    # --------------------------------------------------------------- the exported steps
    def first_step(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cond (B, E) -> the keyframe (B, D) and the cache after it (position 0: the start token)."""
        past_k, past_v = self.decoder.empty_cache(cond.shape[0], cond.device)
        pos = torch.zeros(1, dtype=torch.int64, device=cond.device)
        return self.decoder.step(self.decoder.start(cond), cond, pos, past_k, past_v)

    def next_step(
        self,
        cond: torch.Tensor,
        action: torch.Tensor,
        pos: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step at position pos ((1,) int64, >= 1) from the previous chain step action (B, D)."""
        return self.decoder.step(self.decoder.action_in(action), cond, pos, past_k, past_v)

    def encode_obs(self, state: torch.Tensor, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised state (B, O, S) + images {cam: (B, O, H, W, 3) uint8} -> embedding (B, E)."""
        return self.encoder({"state": state, "images": images})

    # --------------------------------------------------------------- training (carp-train)
    def targets(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) normalised windows -> (chains (B, L, D), valid (B, L) bool, keyframe rows (B,))."""
        phys = (actions.detach().float() * self.action_scale).cpu().numpy()  # offsets cancel in speeds
        key = keyframe_offsets(phys, self.cfg.dt, self.cfg.chain)
        chains, valid = reverse_chains(actions.detach().float().cpu().numpy(), key)
        dev = actions.device
        return (
            torch.from_numpy(chains).to(dev),
            torch.from_numpy(valid).to(dev),
            torch.from_numpy(key).to(dev),
        )

    def loss(self, batch: dict, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Normalised obs batch and (B, L, D) normalised action windows -> (loss, log values): masked L1
        of every head against its chain step (the keyframe weighted by keyframe_weight) +
        latent_weight * the latent consistency L1."""
        L = self.cfg.chain.max_len
        if actions.shape[1:] != (L, self.action_dim):
            raise ValueError(f"actions must be (B, {L}, {self.action_dim}), got {tuple(actions.shape)}")
        chain, valid, key = self.targets(actions)
        cond = self.encoder(batch)  # (B, E)
        pred, h = self.decoder(cond, chain)  # (B, L, P, D), (B, L, n)
        w = torch.ones(L, device=actions.device)
        w[0] = self.cfg.decoder.keyframe_weight  # (L,) per chain step
        l1, count = pred.new_zeros(()), 0
        for p in range(self.decoder.P):  # head p at position i predicts chain step i + p
            m = valid[:, p:].float() * w[p:]  # (B, L - p)
            err = (pred[:, : L - p, p] - chain[:, p:]).abs().mean(-1)  # (B, L - p)
            l1 = l1 + (err * m).sum()
            count = count + m.sum()
        l1 = l1 / count.clamp(min=1)
        emb = self.decoder.action_in(chain).detach()  # (B, L, n): the embedding of the true step i
        m = valid.float()
        latent = ((h - emb).abs().mean(-1) * m).sum() / m.sum().clamp(min=1)
        loss = l1 + self.cfg.decoder.latent_weight * latent
        return loss, {"loss": loss.item(), "l1": l1.item(), "latent": latent.item(),
                      "chain_len": (key + 1).float().mean().item()}  # fmt: skip

    def policy_stage_modules(self) -> nn.ModuleDict:
        """What training optimises and averages into the EMA (keys of policy.safetensors)."""
        return nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder})

    def prepare_policy_stage(self, run: Path, device: torch.device) -> None:
        """The keyframes are found in physical units: the run's normalizer gives the scale."""
        self.set_normalizer(Normalizer.load(Path(run) / "normalization.json"))

    def with_policy_weights(self, net: nn.ModuleDict) -> CoaModel:
        """A copy of this model with the weights of ``net`` (e.g. the EMA), the same action scale."""
        out = CoaModel(self.cfg).to(self.action_scale.device)
        out.load_state_dict(net.state_dict())
        out.action_scale.copy_(self.action_scale)
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part (reports)."""
        return {"encoder": count_parameters(self.encoder), "decoder": count_parameters(self.decoder)}

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def decode_chains(self, batch: dict, chain_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised obs batch (with ``action_now``) -> (chains (B, L, D), lengths (B,)): decoded
        from the keyframe until ``ChainStop`` stops every row, or exactly ``chain_len`` steps."""
        cond = self.encoder(batch)  # (B, E)
        a, k, v = self.first_step(cond)
        steps = [a.float().cpu().numpy()]
        stop = ChainStop(
            batch["action_now"].float().cpu().numpy(), self.action_scale.cpu().numpy(), self.cfg.chain
        )
        done = stop.update(steps[0]) if chain_len is None else np.zeros(len(steps[0]), bool)
        L = self.cfg.chain.max_len
        n = L if chain_len is None else int(chain_len)
        for i in range(1, n):
            if chain_len is None and done.all():
                break
            pos = torch.full((1,), i, dtype=torch.int64, device=cond.device)
            a, k, v = self.next_step(cond, a, pos, k, v)
            steps.append(a.float().cpu().numpy())
            if chain_len is None:
                done = stop.update(steps[-1])
        chains = np.stack(steps, axis=1)  # (B, n_decoded, D)
        lengths = stop.length if chain_len is None else np.full(len(chains), n, dtype=np.int64)
        return chains, lengths

    @torch.no_grad()
    def generate(self, batch: dict, chain_len: int | None = None) -> torch.Tensor:
        """Normalised obs batch (with ``action_now``, the current pose) -> (B, H, D) normalised chunks:
        each chain flipped forward, its first H steps or all of them with the keyframe held."""
        chains, lengths = self.decode_chains(batch, chain_len)
        out = np.stack([chain_to_chunk(c, int(n), self.horizon) for c, n in zip(chains, lengths)])
        return torch.from_numpy(out).to(self.action_scale.device)


class CoaPolicy(ChunkPolicy):
    """Chain-of-Action behind the ``Policy`` protocol: observation -> (16, 10) chunk in physical units."""

    def __init__(
        self,
        config: CoaConfig,
        normalizer: Normalizer,
        weights: dict[str, torch.Tensor] | None = None,
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = CoaModel(config)
        if weights is not None:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint does not match its config: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.model.to(self.device).eval().set_normalizer(normalizer)
        super().__init__(config, normalizer, TorchRunner(self.model, self.device))

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> CoaPolicy:
        """Load a ``carp-train`` CoA run directory (config.yaml, normalization.json, the EMA weights
        in policy.safetensors), in eval mode on ``device``."""
        from safetensors.torch import load_file

        run = Path(run_dir)
        for name in ("config.yaml", "normalization.json", "policy.safetensors"):
            if not (run / name).exists():
                raise FileNotFoundError(f"{run / name} missing: is {run} a finished CoA run?")
        return cls(
            CoaConfig.load(run / "config.yaml"),
            Normalizer.load(run / "normalization.json"),
            load_file(str(run / "policy.safetensors")),
            device=device,
        )

    def predict_chain(self, observation: Any, chain_len: int | None = None) -> tuple[np.ndarray, int]:
        """The whole decoded chain of one observation in physical units, forward in time ((n, D),
        the current frame's action first, the keyframe last) and its length n (for plots and checks)."""
        enc = self.processor.encode([observation])
        chains, lengths = self.model.decode_chains(self.runner.batch_tensors(enc), chain_len)
        n = int(lengths[0])
        return self.processor.decode(chains[0, :n][::-1].copy(), enc.state_now[0]), n


Model = CoaModel  # the names the registry looks up (policies/__init__.py)
Policy = CoaPolicy
