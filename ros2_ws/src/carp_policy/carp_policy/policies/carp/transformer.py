"""The coarse-to-fine autoregressive transformer of CARP: the network alone (modeling_carp.py joins
it with the tokenizer; the policy object in policies/policy.py holds the I/O).

Sequence layout. The K token maps of a chunk (scale k: D*k tokens) are flattened scale-major, and
within a scale dimension-major then time (token d*k + t), so with D=10 and scales (1, 2, 3, 4) the
sequence has T = 10 * (1+2+3+4) = 100 tokens. Scale 1's D tokens are the start tokens: the
observation embedding, projected and broadcast to the D dimension slots. The tokens of scale k > 1
are the embedding of the tokenizer's "next input" (the accumulated quantized features so far,
interpolated down to length k; as in VAR). Every token also gets scale + position-in-scale +
dimension embeddings, and the observation embedding conditions every block through adaptive
LayerNorm (shift/scale/gate, zero-initialised gates). Training: block-causal mask (a token of scale k
attends to all tokens of scales <= k), cross-entropy over the V codes of each token's dimension.
Inference: one forward per scale with a KV cache and no mask (``CarpTransformer.step``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from carp_policy.policies.carp.configuration_carp import TokenizerConfig, TransformerConfig


# ----------------------------------------------------------------------------- transformer
class SelfAttention(nn.Module):
    """Multi-head self-attention with optional mask and optional past keys/values."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.width = cfg.heads, cfg.width
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        nh = self.heads
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nh, C // nh).transpose(1, 2)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)  # (B, nh, T_past + T, hd)
            v = torch.cat([past_v, v], dim=2)
        # explicit attention rather than F.scaled_dot_product_attention: identical numerics in the
        # masked and the cached path, and a plain graph for the ONNX exporter
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // nh))  # (B, nh, T, T_all)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = self.drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.drop(self.proj(y)), k, v


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the observation embedding."""

    def __init__(self, cfg: TransformerConfig, cond_dim: int) -> None:
        super().__init__()
        n = cfg.width
        self.ln1 = nn.LayerNorm(n, elementwise_affine=False)
        self.ln2 = nn.LayerNorm(n, elementwise_affine=False)
        self.attn = SelfAttention(cfg)
        hidden = int(cfg.mlp_ratio * n)
        self.mlp = nn.Sequential(
            nn.Linear(n, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, n), nn.Dropout(cfg.dropout)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * n))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor | None,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (B, T, n), cond: (B, cond_dim)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond).unsqueeze(1).chunk(6, dim=-1)  # each (B, 1, n)
        h, k, v = self.attn(self.ln1(x) * (1 + sc1) + sh1, mask, past_k, past_v)
        x = x + g1 * h
        x = x + g2 * self.mlp(self.ln2(x) * (1 + sc2) + sh2)
        return x, k, v


class CarpTransformer(nn.Module):
    """GPT-2-style decoder predicting the token maps coarse to fine."""

    def __init__(self, cfg: TransformerConfig, tok: TokenizerConfig, cond_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        n, D, scales = cfg.width, tok.action_dim, tuple(tok.scales)
        self.D, self.scales, self.V = D, scales, tok.codebook_size
        self.T = D * sum(scales)
        self.start = nn.Linear(cond_dim, n)  # observation embedding -> the D start tokens
        self.word_embed = nn.Linear(tok.code_dim, n)  # quantized features (C) -> token embedding
        self.scale_embed = nn.Embedding(len(scales), n)
        self.pos_embed = nn.Embedding(sum(scales), n)  # position t within scale k: index off_k + t
        self.dim_embed = nn.Embedding(D, n)
        self.blocks = nn.ModuleList(AdaLNBlock(cfg, cond_dim) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(n, elementwise_affine=False)
        self.ada_f = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * n))
        self.head = nn.Linear(n, tok.codebook_size)
        # per-token ids in sequence order (scale-major, then dimension, then time)
        lvl, pos, dim = [], [], []
        for si, k in enumerate(scales):
            off = sum(scales[:si])
            for d in range(D):
                lvl += [si] * k
                pos += [off + t for t in range(k)]
                dim += [d] * k
        self.register_buffer("lvl_ids", torch.tensor(lvl), persistent=False)
        self.register_buffer("pos_ids", torch.tensor(pos), persistent=False)
        self.register_buffer("dim_ids", torch.tensor(dim), persistent=False)
        lvl_t = torch.tensor(lvl)
        # block-causal: a token of scale i attends to every token of scales <= i
        self.register_buffer("mask", lvl_t[:, None] >= lvl_t[None, :], persistent=False)  # (T, T)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear) and m.weight.abs().sum() > 0:  # keep the zero-initialised adaLN
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def position_embeddings(self) -> torch.Tensor:
        """(T, n) scale + position + dimension embedding of every sequence slot."""
        return self.scale_embed(self.lvl_ids) + self.pos_embed(self.pos_ids) + self.dim_embed(self.dim_ids)

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, cond_dim) -> (B, D, n): the observation embedding in every dimension slot of scale 1."""
        return self.start(cond).unsqueeze(1).expand(-1, self.D, -1)

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, T, n) -> (B, T, V) through the adaptive final norm and the head."""
        shift, scale = self.ada_f(cond).unsqueeze(1).chunk(2, dim=-1)
        return self.head(self.ln_f(x) * (1 + scale) + shift)

    def forward(self, cond: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. cond (B, cond_dim), x_in (B, T - D, C) tokenizer inputs of scales 2..K.

        Returns logits (B, T, V) for all K scales.
        """
        x = torch.cat([self.start_tokens(cond), self.word_embed(x_in)], dim=1)  # (B, T, n)
        x = x + self.position_embeddings()
        for blk in self.blocks:
            x, _, _ = blk(x, cond, self.mask)
        return self.logits(x, cond)

    def empty_cache(
        self, batch: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Past keys/values before scale 1: two (depth, B, heads, 0, head_dim) tensors."""
        c = self.cfg
        shape = (c.depth, batch, c.heads, 0, c.width // c.heads)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def step(
        self, h: torch.Tensor, cond: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One scale with a KV cache, no mask (a scale attends to everything before it and itself).

        h: (B, T_k, n) token embeddings of this scale (``start_tokens`` or ``word_embed(next input)``),
        cond: (B, cond_dim), past_k / past_v: (depth, B, heads, T_past, head_dim).
        Returns logits (B, T_k, V) and present_k / present_v (depth, B, heads, T_past + T_k, head_dim).
        Which scale this is follows from T_past (a shape), so there is no Python control flow on data.
        """
        t0 = past_k.shape[3]
        x = h + self.position_embeddings()[t0 : t0 + h.shape[1]]
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):  # static loop over depth
            x, k, v = blk(x, cond, None, past_k[i], past_v[i])
            ks.append(k)
            vs.append(v)
        return self.logits(x, cond), torch.stack(ks), torch.stack(vs)
