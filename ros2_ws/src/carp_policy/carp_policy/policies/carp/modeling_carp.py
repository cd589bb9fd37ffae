"""CARP: the multi-scale tokenizer and the coarse-to-fine transformer as one model, and its policy.

``CarpModel`` holds everything a CARP checkpoint holds (tokenizer.py, the observation encoder,
transformer.py) with the two entry points of VAR: ``loss`` (teacher forcing, block-causal mask) and
``generate`` (K KV-cached scale steps, coarse to fine). ``scale_step`` is the one scale step: the
torch policy, the exported graphs (export_carp.py) and the export's parity check all run it.
``CarpPolicy`` is the shared ``ChunkPolicy`` (policies/policy.py) with this model as its runner.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carp_policy.actions import GRIPPER
from carp_policy.encoders import build_encoder
from carp_policy.normalization import Normalizer
from carp_policy.policies.carp.configuration_carp import CarpConfig
from carp_policy.policies.carp.tokenizer import MultiScaleTokenizer
from carp_policy.policies.carp.transformer import CarpTransformer
from carp_policy.policies.policy import ChunkPolicy
from carp_policy.processor import EncodedObservations

POSITION_DIMS = 3  # the action layout (actions.py) starts with the TCP's x, y, z


def sample_tokens(
    logits: torch.Tensor, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, T_k, V) -> (B, T_k) code indices: greedy when top_k == 0, else sampled from the top k."""
    if top_k <= 0:
        return logits.argmax(dim=-1)
    vals, idx = logits.topk(top_k, dim=-1)
    pick = torch.multinomial(vals.softmax(-1).flatten(0, 1), 1, generator=generator)  # (B*T_k, 1)
    return idx.flatten(0, 1).gather(1, pick).view(logits.shape[:2])


class CoarseHead(nn.Module):
    """The regressed scale-1 tokens (TransformerConfig.coarse_head_weight): cond (B, E) -> (B, P, H),
    the normalised 16-step profile that the chunk's scale-1 codes of x, y, z (and the gripper, with
    coarse_head_gripper: CarpModel.coarse_dims) decode to.

    ``seen`` (P, V) marks the codes that were a scale-1 target of a training batch: inference picks
    among those only (a code that only ever refined a finer scale decodes alone to a meaningless
    profile). A float, not a bool, because the trainer's EMA averages buffers too; > 0 means seen."""

    def __init__(self, cond_dim: int, dims: int, horizon: int, codebook_size: int, hidden: int = 256) -> None:
        super().__init__()
        self.dims, self.horizon = dims, horizon
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Mish(), nn.Linear(hidden, dims * horizon))
        self.register_buffer("seen", torch.zeros(dims, codebook_size))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.mlp(cond).view(cond.shape[0], self.dims, self.horizon)  # (B, P, H)

    @torch.no_grad()
    def mark_seen(self, idx: torch.Tensor) -> None:
        """idx (B, P) scale-1 target codes of a training batch."""
        self.seen[torch.arange(self.dims, device=idx.device).expand_as(idx), idx] = 1.0


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters())


class CarpModel(nn.Module):
    """Tokenizer + observation encoder + transformer: everything a CARP checkpoint holds."""

    stages = ("tokenizer", "policy")  # carp-train's stages, in order
    policy_log_fields = ("token_acc",)  # what ``loss`` reports besides the loss

    def __init__(self, cfg: CarpConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = MultiScaleTokenizer(cfg.tokenizer)
        self.encoder = build_encoder(cfg.encoder)
        self.gpt = CarpTransformer(cfg.transformer, cfg.tokenizer, cfg.encoder.out_dim)
        # the auxiliary chunk regressor (configuration_carp.TransformerConfig.aux_weight): cond (B, E)
        # -> (B, H*D); trained and saved with the policy stage, never run at inference
        self.aux_head: nn.Module | None = None
        if cfg.transformer.aux_weight > 0:
            tok = cfg.tokenizer
            self.aux_head = nn.Sequential(
                nn.Linear(cfg.encoder.out_dim, 256), nn.Mish(), nn.Linear(256, tok.horizon * tok.action_dim)
            )
            self.policy_log_fields = ("token_acc", "aux_l1")
        self.coarse_head: CoarseHead | None = None
        self._coarse_profiles: tuple[tuple, torch.Tensor] | None = None  # (cache key, (P, V, H))
        # the action dimensions the coarse head regresses and picks: x, y, z (and the gripper)
        self.coarse_dims = tuple(range(POSITION_DIMS)) + (
            (GRIPPER,) if cfg.transformer.coarse_head_gripper else ()
        )
        if cfg.transformer.coarse_head_weight > 0:
            tok = cfg.tokenizer
            self.coarse_head = CoarseHead(
                cfg.encoder.out_dim, len(self.coarse_dims), tok.horizon, tok.codebook_size
            )
            self.policy_log_fields = (*self.policy_log_fields, "coarse_l1")

    @property
    def reads_action_now(self) -> bool:
        """Whether inference reads the current pose (an anchored coarse head that picks the codes):
        then the exported ``carp_obs.onnx`` has an ``action_now`` input."""
        t = self.cfg.transformer
        return t.coarse_head_anchor and t.coarse_decode == "head"

    @staticmethod
    def flat_tokens(idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K token maps (B, D, k) -> (B, T) in sequence order."""
        return torch.cat([idx.flatten(1) for idx in idx_list], dim=1)

    # ------------------------------------------------------------------ training
    def loss(self, batch: dict, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy-stage loss. batch: normalised obs tensors; actions: (B, H, D) normalised targets."""
        # the frozen tokenizer in fp32 even inside the trainer's bf16 autocast: its tokens are the
        # targets, and bf16 would quantise some residuals to other codes than at export
        with torch.no_grad(), torch.autocast(actions.device.type, enabled=False):
            idx_list = self.tokenizer.encode(actions.float())
            x_in = self.tokenizer.teacher_forcing_inputs(idx_list)  # (B, T - D, C)
        target = self.flat_tokens(idx_list)  # (B, T)
        cond = self.encoder(batch)  # (B, E)
        logits = self.gpt(cond, x_in)  # (B, T, V)
        if self.cfg.transformer.coarse_label_sigma > 0:
            P = POSITION_DIMS  # tokens 0..P-1: scale 1 of x, y, z (scale 1 holds one per dimension)
            soft = self.coarse_soft_targets(target[:, :P])  # (B, P, V)
            coarse = -(soft * logits[:, :P].float().log_softmax(-1)).sum(-1)  # (B, P)
            rest = F.cross_entropy(
                logits[:, P:].flatten(0, 1).float(), target[:, P:].flatten(), reduction="none"
            )
            loss = (coarse.sum() + rest.sum()) / target.numel()
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        acc = (logits.argmax(-1) == target).float().mean()
        info = {"token_acc": acc.item()}
        if self.aux_head is not None:
            H = self.cfg.tokenizer.horizon
            pred = self.aux_head(cond).view(actions.shape[0], H, -1)  # (B, H, D)
            aux = F.l1_loss(pred.float(), actions[:, :H].float())
            loss = loss + self.cfg.transformer.aux_weight * aux
            info["aux_l1"] = aux.item()
        if self.coarse_head is not None:
            dims = list(self.coarse_dims)  # scale 1 holds one token per dimension, in order
            prof = self.coarse_profiles()  # (P, V, H)
            goal = prof[torch.arange(len(dims), device=target.device), target[:, dims]]  # (B, P, H)
            coarse_l1 = F.l1_loss(self.coarse_profile(cond, batch.get("action_now")), goal)
            loss = loss + self.cfg.transformer.coarse_head_weight * coarse_l1
            info["coarse_l1"] = coarse_l1.item()
            if self.coarse_head.training:
                self.coarse_head.mark_seen(target[:, dims])
        return loss, {"loss": loss.item(), **info}

    @torch.no_grad()
    def coarse_profiles(self) -> torch.Tensor:
        """(P, V, H): for x, y, z (and the gripper: coarse_dims), every code's normalised chunk when
        it is the scale-1 token and every finer scale is empty (the frozen tokenizer's decoder;
        dimensions decode independently).
        A code's physical fingerprint: what the regressed coarse head (CoarseHead) is matched to.

        Cached (decoding all V codes costs ~60 ms on a CPU): the key is every tokenizer tensor's
        in-place version, so training the tokenizer or loading weights into it recomputes it."""
        tok = self.tokenizer
        key = tuple((t.data_ptr(), t._version) for t in tok.state_dict(keep_vars=True).values())
        if self._coarse_profiles is not None and self._coarse_profiles[0] == key:
            return self._coarse_profiles[1]
        idx = torch.arange(tok.V, device=tok.codebook.device).view(tok.V, 1, 1).expand(tok.V, tok.D, 1)
        f_hat, _ = tok.next_input(0, tok.codebook.new_zeros(tok.V, tok.D * tok.C, tok.L), idx)
        prof = tok.decode_features(f_hat)[..., list(self.coarse_dims)].permute(2, 0, 1).float()  # (P, V, H)
        self._coarse_profiles = (key, prof)
        return prof

    @torch.no_grad()
    def coarse_soft_targets(self, idx: torch.Tensor) -> torch.Tensor:
        """Scale-1 targets of the first P dimensions (B, P) code indices -> (B, P, V) distributions: a
        Gaussian over the distance of every code to the target's in the frozen codebook
        (TransformerConfig.coarse_label_sigma)."""
        P = idx.shape[1]
        cb = self.tokenizer.codebook[:P].float()  # (P, V, C)
        e = cb[torch.arange(P, device=idx.device), idx]  # (B, P, C) the target codes
        d2 = (cb.unsqueeze(0) - e.unsqueeze(2)).pow(2).sum(-1)  # (B, P, V)
        # the width relative to the target code's own norm: a big move (a long code) tolerates a
        # neighbour a centimetre off, a small correction only its near-duplicates
        sigma = (self.cfg.transformer.coarse_label_sigma * e.norm(dim=-1)).clamp_min(1e-6)  # (B, P)
        return (-d2 / (2 * sigma.pow(2).unsqueeze(-1))).softmax(-1)

    def policy_stage_modules(self) -> nn.ModuleDict:
        """What the policy stage trains (and averages into the EMA): encoder + transformer (+ the
        auxiliary and coarse heads when configured)."""
        mods = {"encoder": self.encoder, "gpt": self.gpt}
        if self.aux_head is not None:
            mods["aux_head"] = self.aux_head
        if self.coarse_head is not None:
            mods["coarse_head"] = self.coarse_head
        return nn.ModuleDict(mods)

    def prepare_policy_stage(self, run: Path, device: torch.device) -> None:
        """The policy stage reads the frozen tokenizer of stage 1 from the run directory."""
        from safetensors.torch import load_file

        tok_path = run / "tokenizer.safetensors"
        if not tok_path.exists():
            raise FileNotFoundError(f"{tok_path} missing: run --stage tokenizer first (or --stage all)")
        self.load_state_dict(load_file(str(tok_path), device=str(device)), strict=False)
        self.tokenizer.eval().requires_grad_(False)

    def with_policy_weights(self, net: nn.ModuleDict) -> CarpModel:
        """A copy of this model with the policy stage's modules from ``net`` (e.g. the EMA)."""
        out = CarpModel(self.cfg).to(next(self.parameters()).device)
        out.tokenizer.load_state_dict(self.tokenizer.state_dict())
        out.encoder.load_state_dict(net["encoder"].state_dict())
        out.gpt.load_state_dict(net["gpt"].state_dict())
        if out.aux_head is not None:
            out.aux_head.load_state_dict(net["aux_head"].state_dict())
        if out.coarse_head is not None:
            out.coarse_head.load_state_dict(net["coarse_head"].state_dict())
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part (reports); the coarse head's when the model has one (it runs
        at inference; the auxiliary head does not)."""
        counts = {
            "encoder": count_parameters(self.encoder),
            "transformer": count_parameters(self.gpt),
            "tokenizer": count_parameters(self.tokenizer),
        }
        if self.coarse_head is not None:
            counts["coarse_head"] = count_parameters(self.coarse_head)
        return counts

    # ------------------------------------------------------------------ inference
    def scale_step(
        self,
        si: int,
        cond: torch.Tensor,
        x_in: torch.Tensor | None,
        f_hat: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        action_now: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """One coarse-to-fine step: the transformer on scale ``si``'s input, its tokens, the
        tokenizer's accumulation and the next scale's input.

        si: scale index (static int); cond (B, E); x_in: (B, D*k_si, C) the previous step's
        ``x_next`` (None at scale 0: the start tokens from ``cond``); f_hat (B, D*C, L) accumulated
        so far (zeros before scale 0); past_k / past_v (depth, B, heads, T_past, head_dim).
        action_now (B, D): the current pose as a normalised action (the anchored coarse head's).
        Returns (tokens (B, D, k_si), f_hat', x_next (B, D*k_{si+1}, C), present_k, present_v);
        after the last scale x_next is (B, 0, C). Greedy when top_k == 0 (what the graphs do)."""
        tok, gpt = self.tokenizer, self.gpt
        h = gpt.start_tokens(cond) if si == 0 else gpt.word_embed(x_in)  # (B, D*k_si, n)
        logits, k, v = gpt.step(h, cond, past_k, past_v)  # (B, D*k_si, V)
        idx = sample_tokens(logits, top_k, generator).view(cond.shape[0], tok.D, tok.scales[si])
        decode = self.cfg.transformer.coarse_decode
        if si == 0 and top_k <= 0 and decode != "argmax":
            P = POSITION_DIMS  # x, y, z from the codebook mean or the head; the rest argmax
            if decode == "expected":
                idx = torch.cat([self.expected_codes(logits[:, :P]), idx[:, P:]], dim=1)  # (B, D, 1)
            else:  # the head's dimensions from the head (slices and a cat: static in the graphs)
                coarse, dims = self.head_codes(cond, action_now), self.coarse_dims  # (B, P, 1)
                idx = torch.cat(
                    [coarse[:, [dims.index(d)]] if d in dims else idx[:, [d]] for d in range(tok.D)], dim=1
                )
        f_hat, nxt = tok.next_input(si, f_hat, idx)
        return idx, f_hat, nxt, k, v

    def expected_codes(self, logits: torch.Tensor) -> torch.Tensor:
        """Scale-1 logits of the first P dimensions (B, P, V) -> (B, P, 1): per dimension, the code
        nearest (by the tokenizer's lookup) to the mean of that dimension's codebook under
        softmax(logits) (TransformerConfig.coarse_decode = "expected")."""
        tok, P = self.tokenizer, logits.shape[1]
        cb = tok.codebook[:P]  # (P, V, C)
        mean = torch.einsum("bpv,pvc->bpc", logits.float().softmax(-1), cb.float())  # (B, P, C)
        return tok.lookup(mean.to(cb.dtype).reshape(mean.shape[0], P * tok.C, 1), dims=P)

    def coarse_profile(self, cond: torch.Tensor, action_now: torch.Tensor | None) -> torch.Tensor:
        """The coarse head's regressed profile (B, P, H) of coarse_dims, normalised. With
        TransformerConfig.coarse_head_anchor the head regresses the move from the current pose
        (action_now (B, D), the TCP as a normalised action) and the pose is added back."""
        assert self.coarse_head is not None
        pred = self.coarse_head(cond).float()  # (B, P, H)
        if not self.cfg.transformer.coarse_head_anchor:
            return pred
        if action_now is None:
            raise ValueError("coarse_head_anchor: the observation batch has no action_now (the current pose)")
        return pred + action_now[:, list(self.coarse_dims), None].float()

    def head_codes(self, cond: torch.Tensor, action_now: torch.Tensor | None = None) -> torch.Tensor:
        """cond (B, E) -> (B, P, 1): per dimension of coarse_dims, the seen scale-1 code whose profile
        (coarse_profiles) lies nearest, in L1, to the one the coarse head regresses
        (TransformerConfig.coarse_decode = "head"). Nearest along a physical profile, so the choice
        is ordered by where the chunk goes, whatever the codes' order in the codebook.
        action_now (B, D): the current pose (needed with coarse_head_anchor)."""
        head = self.coarse_head
        if head is None:
            raise ValueError(
                "coarse_decode 'head' needs a model trained with transformer.coarse_head_weight > 0"
            )
        pred = self.coarse_profile(cond, action_now)  # (B, P, H)
        dist = (self.coarse_profiles().unsqueeze(0) - pred.unsqueeze(2)).abs().sum(-1)  # (B, P, V)
        dist = dist + (head.seen <= 0).float() * 1e6  # never a code no training chunk started with
        return dist.argmin(dim=-1, keepdim=True)

    @torch.no_grad()
    def generate(
        self,
        batch: dict,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        tokens: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Observation batch -> (B, H, D) normalised actions: K cached scale steps, coarse to fine.

        tokens: a list that receives the K token maps (B, D, k) (parity checks)."""
        tok, gpt = self.tokenizer, self.gpt
        cond = self.encoder(batch)  # (B, cond_dim)
        B = cond.shape[0]
        past_k, past_v = gpt.empty_cache(B, cond.device)
        f_hat, x_in = cond.new_zeros(B, tok.D * tok.C, tok.L), None
        for si in range(len(tok.scales)):  # static loop over K scales
            idx, f_hat, x_in, past_k, past_v = self.scale_step(
                si, cond, x_in, f_hat, past_k, past_v, top_k, generator, batch.get("action_now")
            )
            if tokens is not None:
                tokens.append(idx)
        return tok.decode_features(f_hat)


class TorchRunner:
    """A torch model with ``generate(batch) -> (B, H, D)`` as the runner of a ``ChunkPolicy``.

    Inference touches no module state (eval mode, no grad), so calls from two threads need no lock;
    ``lock`` serialises models that keep state in helpers (DP-C's diffusers scheduler)."""

    def __init__(self, model: nn.Module, device: str | torch.device, lock: bool = False, **generate_kw: Any):
        self.model, self.device = model, torch.device(device)
        self.generate_kw = generate_kw
        self.batch = 1  # a shift ensemble calls a torch policy once per copy (engines batch them)
        self._lock = threading.Lock() if lock else None

    def batch_tensors(self, obs: EncodedObservations) -> dict:
        """Encoded observations -> the encoders' batch dict of tensors on the device."""
        batch = {
            "state": torch.from_numpy(obs.state).to(self.device),
            "images": {c: torch.from_numpy(v).to(self.device) for c, v in obs.images.items()},
        }
        if obs.action_now is not None:
            batch["action_now"] = torch.from_numpy(np.ascontiguousarray(obs.action_now)).to(self.device)
        if obs.task is not None:
            batch["task"] = torch.from_numpy(obs.task).to(self.device)
        return batch

    def run(self, obs: EncodedObservations, **kw: Any) -> np.ndarray:
        batch = self.batch_tensors(obs)
        with torch.no_grad():
            if self._lock is None:
                out = self.model.generate(batch, **self.generate_kw, **kw)
            else:
                with self._lock:
                    out = self.model.generate(batch, **self.generate_kw, **kw)
        return out.float().cpu().numpy()

    def reset(self) -> None:
        """Torch models keep no state between chunks (the observation history lives with the caller)."""


class CarpPolicy(ChunkPolicy):
    """CARP behind the stack's ``Policy`` protocol: Observation -> 16-step ActionChunk in physical units."""

    def __init__(
        self,
        config: CarpConfig,
        weights: dict[str, torch.Tensor] | None,
        normalizer: Normalizer,
        device: str = "cpu",
        top_k: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.model = CarpModel(config)
        if weights is not None:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint does not match the config: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.model.to(self.device).eval()
        self.top_k = top_k
        super().__init__(config, normalizer, TorchRunner(self.model, self.device, top_k=top_k))

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", top_k: int = 0) -> CarpPolicy:
        """Load a ``carp-train`` run directory (config.yaml, normalization.json, the EMA weights)."""
        from safetensors.torch import load_file

        run = Path(run_dir)
        for name in ("config.yaml", "normalization.json", "tokenizer.safetensors", "policy.safetensors"):
            if not (run / name).exists():
                raise FileNotFoundError(f"{run / name} missing: is {run} a finished carp-train run?")
        weights = load_file(str(run / "tokenizer.safetensors"))
        weights.update(load_file(str(run / "policy.safetensors")))
        return cls(
            CarpConfig.load(run / "config.yaml"),
            weights,
            Normalizer.load(run / "normalization.json"),
            device=device,
            top_k=top_k,
        )

    def predict_with_tokens(self, observation: Any) -> tuple[Any, list[np.ndarray]]:
        """The chunk and the K greedy token maps (1, D, k) (for parity checks)."""
        enc = self.processor.encode([observation])
        tokens: list[torch.Tensor] = []
        actions = self.model.generate(self.runner.batch_tensors(enc), tokens=tokens).float().cpu().numpy()
        from carp_policy.actions import ActionChunk

        chunk = ActionChunk(self.processor.decode(actions[0], enc.state_now[0]), observation.timestamp)
        return chunk, [t.cpu().numpy() for t in tokens]

    def describe(self) -> str:
        """One-line summary with parameter counts."""
        c = self.model.parameter_counts()
        policy = c["encoder"] + c["transformer"] + c.get("coarse_head", 0)
        return json.dumps({"name": self.config.name, **c, "policy_params": policy})


Model = CarpModel  # the names the registry looks up (policies/__init__.py)
Policy = CarpPolicy
