"""Observation encoders shared by every policy family (CARP, CoA, DP-C).

- ``StateEncoder``: an MLP over the flattened obs horizon of the normalised state (O=2 in the paper).
- ``VisualEncoder``: per camera a ResNet-18-topology trunk with GroupNorm instead of BatchNorm (batch
  statistics are poor with small robot batches and EMA weights) and a spatial-softmax keypoint head,
  concatenated with proprioception (normalised state), obs horizon 1. Random crop and colour jitter in
  training, center crop at eval.

Both map a batch ``{"state": (B, O, S), "images": {cam: (B, O, H, W, 3) uint8}}`` to (B, out_dim).
A multi-task model (``encoder.tasks``) also reads ``"task"`` (B,) int64 and adds that task's learned
embedding to the observation embedding (``TaskEmbedding``).

Width: torchvision's ResNet-18 (64-128-256-512) has 11.2M parameters per camera, more than the whole
10M budget of the visual policy for two cameras, so the trunk takes a width multiplier; the default
``resnet_width=32`` (32-64-128-256) is the same topology at ~2.8M per camera. With width 64 the module
names match torchvision's, so users who have a torchvision-format checkpoint can load it
(``pretrained_path``); nothing requires one.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from carp_policy.policies.base import EncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 16 channels per group (robomimic / Diffusion Policy use C // 16 groups)."""
    return nn.GroupNorm(max(1, channels // 16), channels)


class ResNetTrunk(nn.Module):
    """ResNet-18 topology (2-2-2-2 BasicBlocks) with GroupNorm and a width multiplier, no pooling/fc.

    (B, 3, H, W) -> (B, 8*width, H/32, W/32); with ``stages=3`` it stops after layer3:
    (B, 4*width, H/16, W/16). Built from torchvision's BasicBlock; module names follow
    torchvision.models.resnet18 so its state dicts load at width 64.
    """

    def __init__(self, width: int = 32, stages: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _group_norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inplanes = width
        self.layer1 = self._make_layer(width, 1)
        self.layer2 = self._make_layer(width * 2, 2)
        self.layer3 = self._make_layer(width * 4, 2)
        self.layer4 = self._make_layer(width * 8, 2) if stages == 4 else nn.Identity()
        self.out_channels = width * 2 ** (stages - 1)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), _group_norm(planes)
            )
        blocks = [
            BasicBlock(self.inplanes, planes, stride, down, norm_layer=_group_norm),
            BasicBlock(planes, planes, norm_layer=_group_norm),
        ]
        self.inplanes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SpatialSoftmax(nn.Module):
    """Keypoint head: 1x1 conv to K maps, softmax over pixels, expected (x, y) per map -> (B, 2K)."""

    def __init__(self, in_channels: int, keypoints: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        logits = self.proj(x).flatten(2)  # (B, K, h*w)
        attn = logits.softmax(-1)
        # the grid as arange * step - 1 (== linspace(-1, 1, n)): the legacy ONNX exporter turns
        # linspace into a float64 constant, which makes the whole fusion MLP float64 in the graph
        ys = torch.arange(h, device=x.device, dtype=x.dtype) * (2.0 / max(h - 1, 1)) - 1.0
        xs = torch.arange(w, device=x.device, dtype=x.dtype) * (2.0 / max(w - 1, 1)) - 1.0
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        kx = (attn * gx.reshape(1, 1, -1)).sum(-1)  # (B, K)
        ky = (attn * gy.reshape(1, 1, -1)).sum(-1)
        return torch.cat([kx, ky], dim=-1)  # (B, 2K)


class TaskEmbedding(nn.Module):
    """A multi-task model's task conditioning: one learned (out_dim,) row per task, added to the
    observation embedding, so every block that the embedding conditions (CARP's adaptive LayerNorm)
    knows the task. Zero-initialised: training starts from the task-agnostic model."""

    def __init__(self, tasks: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(tasks, dim)
        nn.init.zeros_(self.table.weight)

    def forward(self, emb: torch.Tensor, batch: dict) -> torch.Tensor:
        # emb (B, out_dim), batch["task"] (B,) int64 -> (B, out_dim)
        if "task" not in batch:
            raise ValueError("a multi-task encoder needs batch['task'] (the task index per row)")
        return emb + self.table(batch["task"])


def task_embedding(cfg: EncoderConfig) -> TaskEmbedding | None:
    """The encoder's task embedding (None for a single-task model)."""
    return TaskEmbedding(len(cfg.tasks), cfg.out_dim) if cfg.tasks else None


class StateEncoder(nn.Module):
    """MLP over the obs horizon of the normalised state: (B, O, S) -> (B, out_dim)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(
            nn.Linear(cfg.obs_horizon * cfg.input_state_dim, cfg.hidden),
            nn.Mish(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.Mish(),
            nn.Linear(cfg.hidden, cfg.out_dim),
        )
        self.task = task_embedding(cfg)

    def forward(self, batch: dict) -> torch.Tensor:
        state = batch["state"]  # (B, O, S)
        emb = self.net(state.flatten(1))  # (B, out_dim)
        return emb if self.task is None else self.task(emb, batch)


class VisualEncoder(nn.Module):
    """Per-camera ResNet trunk + spatial softmax, concatenated with proprioception -> (B, out_dim).

    The cameras are encoded at the newest row only; the state at all O rows (``obs_horizon``, spaced
    ``obs_stride`` control periods apart). A proprioceptive history costs nothing, a second frame per
    camera doubles the trunks' work, and what the history must tell (was the gripper open a moment
    ago?) the state says exactly."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cameras = tuple(cfg.cameras)
        self.trunks = nn.ModuleDict(
            {c: ResNetTrunk(cfg.resnet_width, cfg.trunk_stages) for c in self.cameras}
        )
        self.heads = nn.ModuleDict(
            {c: SpatialSoftmax(self.trunks[c].out_channels, cfg.keypoints) for c in self.cameras}
        )
        if cfg.pretrained_path:
            self.load_pretrained(cfg.pretrained_path)
        feat = len(self.cameras) * 2 * cfg.keypoints + cfg.obs_horizon * cfg.input_state_dim
        self.fuse = nn.Sequential(nn.Linear(feat, cfg.hidden), nn.Mish(), nn.Linear(cfg.hidden, cfg.out_dim))
        self.task = task_embedding(cfg)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_pretrained(self, path: str) -> None:
        """Load a torchvision-format ResNet-18 state dict into every trunk (width 64 only).

        BatchNorm running statistics in such a checkpoint have no GroupNorm counterpart and are
        skipped; the affine weights and all convolutions load.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        for trunk in self.trunks.values():
            own = trunk.state_dict()
            usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            if not any(k.endswith("conv1.weight") for k in usable):
                raise ValueError(f"{path}: no ResNet-18 weights of matching width (resnet_width must be 64)")
            trunk.load_state_dict(usable, strict=False)

    def crop(self, img: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, ch, cw): a random crop per image in training, the center at eval."""
        ch, cw = self.cfg.crop_size
        N, _, H, W = img.shape
        if self.training:
            # per-sample offsets; a gather over an unfolded view would avoid the loop, but N is small
            ys = torch.randint(0, H - ch + 1, (N,)).tolist()
            xs = torch.randint(0, W - cw + 1, (N,)).tolist()
            return torch.stack([img[i, :, y : y + ch, x : x + cw] for i, (y, x) in enumerate(zip(ys, xs))])
        y, x = (H - ch) // 2, (W - cw) // 2
        return img[:, :, y : y + ch, x : x + cw]

    def jitter(self, img: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> the same with a random brightness, contrast and saturation per image.

        torchvision's ColorJitter draws one factor per call (one for the whole batch); here each image
        gets its own, in one vectorised pass. Only in training, and only where ``color_jitter`` is set.
        """
        b, c, s = self.cfg.color_jitter
        if not self.training or not (b or c or s):
            return img
        N = img.shape[0]

        def factor(j: float) -> torch.Tensor:
            return 1.0 + (torch.rand(N, 1, 1, 1, device=img.device) * 2.0 - 1.0) * j  # (N, 1, 1, 1)

        img = img * factor(b)
        gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)  # (N, 1, h, w)
        img = (img - gray.mean((2, 3), keepdim=True)) * factor(c) + gray.mean((2, 3), keepdim=True)
        gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
        img = (img - gray) * factor(s) + gray
        return img.clamp(0.0, 1.0)

    def keypoints(self, cam: str, img: torch.Tensor) -> torch.Tensor:
        """One camera's images (B, O, H, W, 3) uint8 -> its keypoints (B*O, 2K): crop, colour jitter
        (training only), normalisation, trunk, spatial softmax."""
        x = img.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0  # (B*O, 3, H, W)
        x = (self.jitter(self.crop(x)) - self.mean) / self.std
        return self.heads[cam](self.trunks[cam](x))

    def forward(self, batch: dict) -> torch.Tensor:
        state = batch["state"]  # (B, O, S)
        B = state.shape[0]
        # (B, 1, H, W, 3) per camera: the newest frame -> (B, 2K) keypoints
        feats = [self.keypoints(cam, batch["images"][cam][:, -1:]).view(B, -1) for cam in self.cameras]
        feats.append(state.flatten(1))
        emb = self.fuse(torch.cat(feats, dim=-1))  # (B, out_dim)
        return emb if self.task is None else self.task(emb, batch)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """The encoder named by ``cfg.kind``."""
    return StateEncoder(cfg) if cfg.kind == "state" else VisualEncoder(cfg)
