"""Multi-scale action tokenizer: Algorithm 1 of CARP, a residual multi-scale VQ-VAE per action dimension.

A chunk of H=16 normalised actions (B, H, D) is encoded, per dimension, into L=4 temporal features of
C=8 numbers. Residual quantization over scales (1, 2, 3, 4) turns the feature map into K token maps
(scale k: (B, D, k) code indices): at scale k the residual is interpolated down to length k, quantized
by nearest code (L2 by default, cosine as in the paper: ``lookup`` in the config) against the
dimension's codebook (V=512 entries of C, shared across scales),
interpolated back to L, refined by a conv phi_k, and subtracted. The decoder maps the quantized
feature map f_hat = sum_k phi_k(up(z_k)) back to the chunk.

Built for launch count, not FLOPs: the D per-dimension VQ-VAEs are ONE module of grouped 1D convs
(groups=D) with one stacked codebook (D, V, C), so a forward is the same few kernels for any D and
there is no Python loop over dimensions. Interpolations are fixed (k x L) matrices, so the scale
step is plain matmuls that export to ONNX unchanged.

Internal feature layout: (B, D*C, L), channel d*C + c is feature c of dimension d. Token layout (what
the transformer sees): within one scale, dimension-major then time, token d*k + t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from carp_policy.policies.carp.configuration_carp import TokenizerConfig


def _interp_matrix(src: int, dst: int, mode: str) -> torch.Tensor:
    """(dst, src) matrix M with M @ x == F.interpolate(x, dst, mode) along the last axis."""
    eye = torch.eye(src).unsqueeze(0)  # (1, src, src): src signals, each a unit impulse
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(eye, size=dst, mode=mode, **kw)[0].T.contiguous()


class MultiScaleTokenizer(nn.Module):
    """D per-dimension residual multi-scale VQ-VAEs run as one grouped module."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, C, h, V = cfg.action_dim, cfg.code_dim, cfg.hidden, cfg.codebook_size
        self.D, self.C, self.V, self.L, self.H = D, C, V, cfg.latent_len, cfg.horizon
        self.scales = tuple(cfg.scales)
        g = dict(groups=D)
        # encoder: (B, D, 16) -> (B, D*C, 4); every conv is grouped, so dimension d only sees itself
        self.encoder = nn.Sequential(
            nn.Conv1d(D, D * h, 3, padding=1, **g),
            nn.SiLU(),
            nn.Conv1d(D * h, D * h, 4, stride=2, padding=1, **g),
            nn.SiLU(),  # 16 -> 8
            nn.Conv1d(D * h, D * h, 4, stride=2, padding=1, **g),
            nn.SiLU(),  # 8 -> 4
            nn.Conv1d(D * h, D * C, 3, padding=1, **g),
        )
        # decoder: (B, D*C, 4) -> (B, D, 16)
        self.decoder = nn.Sequential(
            nn.Conv1d(D * C, D * h, 3, padding=1, **g),
            nn.SiLU(),
            nn.ConvTranspose1d(D * h, D * h, 4, stride=2, padding=1, **g),
            nn.SiLU(),  # 4 -> 8
            nn.ConvTranspose1d(D * h, D * h, 4, stride=2, padding=1, **g),
            nn.SiLU(),  # 8 -> 16
            nn.Conv1d(D * h, D, 3, padding=1, **g),
        )
        self.codebook = nn.Parameter(torch.randn(D, V, C))  # (D, V, C), one codebook per dimension
        self.phi = nn.ModuleList(nn.Conv1d(D * C, D * C, 3, padding=1, **g) for _ in self.scales)
        # fixed interpolation matrices: area down (L -> k), linear up (k -> L), as VAR interpolates
        for i, k in enumerate(self.scales):
            self.register_buffer(f"down_{i}", _interp_matrix(self.L, k, "area"), persistent=False)
            self.register_buffer(f"up_{i}", _interp_matrix(k, self.L, "linear"), persistent=False)
        # code hits since the last dead-code revival (training bookkeeping, not a weight)
        self.register_buffer("usage", torch.zeros(D, V), persistent=False)
        self.register_buffer("code_offset", torch.arange(D).view(1, D, 1) * V, persistent=False)
        self._recent: torch.Tensor | None = None  # (N, D, C) residuals of the last training batch

    # ------------------------------------------------------------------ helpers
    def _down(self, si: int, x: torch.Tensor) -> torch.Tensor:
        """(B, D*C, L) -> (B, D*C, k) area interpolation to scale si."""
        return x @ getattr(self, f"down_{si}").T

    def _up(self, si: int, x: torch.Tensor) -> torch.Tensor:
        """(B, D*C, k) -> (B, D*C, L) linear interpolation from scale si."""
        return x @ getattr(self, f"up_{si}").T

    def _phi(self, si: int, x: torch.Tensor) -> torch.Tensor:
        """phi_k: a residual blend of identity and a conv, (B, D*C, L) -> (B, D*C, L)."""
        r = self.cfg.phi_ratio
        return x * (1.0 - r) + self.phi[si](x) * r

    def maps_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D*C, k) feature map -> (B, D*k, C) tokens, dimension-major."""
        B, _, k = x.shape
        return x.view(B, self.D, self.C, k).transpose(2, 3).reshape(B, self.D * k, self.C)

    def lookup(self, r: torch.Tensor, dims: int | None = None) -> torch.Tensor:
        """Nearest codes: (B, D*C, k) residual -> (B, D, k) indices; with ``dims`` = P only the first
        P dimensions: (B, P*C, k) -> (B, P, k).

        ``cosine`` (the paper's choice) matches direction only; ``l2`` also matches magnitude, which
        matters because one codebook serves every scale and the residual shrinks from scale to scale
        (measured on the cup demos: l2 halves the reconstruction error at equal training steps).
        """
        B, _, k = r.shape
        cb = self.codebook if dims is None else self.codebook[:dims]  # (D, V, C)
        rv = r.view(B, cb.shape[0], self.C, k)  # (B, D, C, k)
        if self.cfg.lookup == "cosine":
            sim = torch.einsum("bdck,dvc->bdkv", F.normalize(rv, dim=2), F.normalize(cb, dim=-1))
            return sim.argmax(dim=-1)
        # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2; ||r||^2 is the same for every code, so it is dropped
        dots = torch.einsum("bdck,dvc->bdkv", rv, cb)  # (B, D, k, V)
        c2 = cb.pow(2).sum(-1)[None, :, None, :]  # (1, D, 1, V)
        return (c2 - 2 * dots).argmin(dim=-1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, D, k) code indices -> (B, D*C, k) codebook vectors (one flat table, no per-dim loop)."""
        B, _, k = idx.shape
        z = F.embedding(idx + self.code_offset, self.codebook.view(self.D * self.V, self.C))  # (B,D,k,C)
        return z.transpose(2, 3).reshape(B, self.D * self.C, k)

    # ------------------------------------------------------------------ encoder / decoder
    def encode_features(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, H, D) normalised actions -> (B, D*C, L) continuous features."""
        if actions.ndim != 3 or actions.shape[1:] != (self.H, self.D):
            raise ValueError(f"tokenizer expects actions (B, {self.H}, {self.D}), got {tuple(actions.shape)}")
        return self.encoder(actions.transpose(1, 2))

    def decode_features(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, D*C, L) quantized features -> (B, H, D) normalised actions."""
        return self.decoder(f_hat).transpose(1, 2)

    def quantize(self, f: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Residual multi-scale quantization (Algorithm 1).

        f: (B, D*C, L). Returns f_hat with the straight-through gradient to f, the K token maps
        (B, D, k), and the VQ loss: sum over scales of ||f_hat_k - sg(f)||^2 + beta ||sg(f_hat_k) - f||^2.
        """
        f_ng = f.detach()
        f_rest = f_ng.clone()
        f_hat = torch.zeros_like(f)
        idx_list, loss, recent = [], f.new_zeros(()), []
        for si in range(len(self.scales)):  # static loop over K=4 scales
            r_k = self._down(si, f_rest)  # (B, D*C, k)
            idx = self.lookup(r_k)  # (B, D, k)
            h = self._phi(si, self._up(si, self.embed(idx)))  # (B, D*C, L)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat, f_ng) + self.cfg.beta * F.mse_loss(f_hat.detach(), f)
            idx_list.append(idx)
            if self.training:
                B, _, k = r_k.shape  # keep (B*k, D, C) residual vectors as revival candidates
                recent.append(
                    r_k.view(B, self.D, self.C, k).permute(0, 3, 1, 2).reshape(B * k, self.D, self.C)
                )
        if self.training:
            with torch.no_grad():
                for idx in idx_list:
                    flat = idx.transpose(0, 1).reshape(self.D, -1)  # (D, B*k)
                    self.usage.scatter_add_(1, flat, torch.ones_like(flat, dtype=self.usage.dtype))
                self._recent = torch.cat(recent).detach()
        f_hat_st = (f_hat.detach() - f_ng) + f  # straight-through: decoder grads flow to the encoder
        return f_hat_st, idx_list, loss

    def forward(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training forward: (B, H, D) -> (reconstruction (B, H, D), loss, token maps)."""
        f = self.encode_features(actions)
        f_hat, idx_list, vq_loss = self.quantize(f)
        recon = self.decode_features(f_hat)
        return recon, F.mse_loss(recon, actions) + vq_loss, idx_list

    # ------------------------------------------------------------------ public token API
    @torch.no_grad()
    def encode(self, actions: torch.Tensor) -> list[torch.Tensor]:
        """(B, H, D) normalised actions -> K token maps, scale k: (B, D, k) long."""
        return self.quantize(self.encode_features(actions))[1]

    def tokens_to_features(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K token maps -> f_hat (B, D*C, L) = sum_k phi_k(up(z_k))."""
        f_hat = 0.0
        for si, idx in enumerate(idx_list):
            f_hat = f_hat + self._phi(si, self._up(si, self.embed(idx)))
        return f_hat

    def decode(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K token maps -> (B, H, D) normalised actions."""
        return self.decode_features(self.tokens_to_features(idx_list))

    def next_input(
        self, si: int, f_hat: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Incremental inference step: add scale si's tokens to f_hat and make the next scale's input.

        si: scale index (static Python int); f_hat: (B, D*C, L) accumulated so far (zeros before
        scale 0); idx: (B, D, k_si). Returns (f_hat', next tokens (B, D*k_{si+1}, C)); after the
        last scale the second item is an empty (B, 0, C) tensor.
        """
        f_hat = f_hat + self._phi(si, self._up(si, self.embed(idx)))
        if si + 1 == len(self.scales):
            return f_hat, f_hat.new_zeros(f_hat.shape[0], 0, self.C)
        return f_hat, self.maps_to_tokens(self._down(si + 1, f_hat))

    def teacher_forcing_inputs(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Ground-truth token maps -> transformer inputs for scales 2..K: (B, D*sum(scales[1:]), C)."""
        f_hat = torch.zeros(idx_list[0].shape[0], self.D * self.C, self.L, device=idx_list[0].device)
        inputs = []
        for si in range(len(self.scales) - 1):
            f_hat, nxt = self.next_input(si, f_hat, idx_list[si])
            inputs.append(nxt)
        return torch.cat(inputs, dim=1)

    # ------------------------------------------------------------------ codebook health
    @torch.no_grad()
    def revive_dead_codes(self, noise: float = 0.01) -> int:
        """Re-initialise codes unused since the last call to residual vectors of the last batch.

        A dead code (zero hits per dimension since the previous revival) is replaced by a randomly
        drawn pre-quantization residual of its own dimension (plus small noise), so it sits where
        the data is and is picked again. Returns how many codes were revived.
        """
        if self._recent is None:
            return 0
        dead = self.usage == 0  # (D, V)
        n = int(dead.sum())
        if n:
            pick = torch.randint(0, self._recent.shape[0], (self.V,), device=dead.device)
            fresh = self._recent[pick].transpose(0, 1)  # (D, V, C)
            fresh = fresh + noise * fresh.std() * torch.randn_like(fresh)
            self.codebook.data = torch.where(dead.unsqueeze(-1), fresh, self.codebook.data)
        self.usage.zero_()
        return n

    @torch.no_grad()
    def code_stats(self, idx_lists: list[list[torch.Tensor]]) -> dict[str, list[float]]:
        """Usage over many batches of token maps: used codes and perplexity per dimension."""
        counts = torch.zeros(self.D, self.V)
        for idx_list in idx_lists:
            for idx in idx_list:
                flat = idx.transpose(0, 1).reshape(self.D, -1).cpu()
                counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
        p = counts / counts.sum(1, keepdim=True).clamp_min(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
        return {
            "used_codes": (counts > 0).sum(1).tolist(),
            "perplexity": entropy.exp().tolist(),
            "codebook_size": self.V,
        }
