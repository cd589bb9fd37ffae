"""Configuration of the CARP policy and its training: dataclasses, loadable from and saved to YAML.

One ``CarpConfig`` holds everything a run needs; ``configs/state.yaml`` and ``configs/visual.yaml``
are the two shipped variants. Unknown keys are an error (a typo must not silently fall back to a
default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


def config_path(path: str | Path) -> Path:
    """A YAML file, or the shipped variant of that name (``configs/<name>.yaml``)."""
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        p = CONFIG_DIR / f"{path}.yaml"
    if not p.exists():
        shipped = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"config not found: {path} (shipped: {shipped})")
    return p


@dataclass
class TokenizerConfig:
    """Multi-scale action VQ-VAE (stage 1)."""

    action_dim: int = 10  # D: one VQ-VAE per action dimension
    horizon: int = 16  # H: action chunk length
    latent_len: int = 4  # L: temporal feature length after the encoder (H / 4)
    code_dim: int = 8  # C: feature / codebook entry size
    codebook_size: int = 512  # V: codebook entries per dimension, shared across scales
    scales: tuple[int, ...] = (1, 2, 3, 4)  # token-map lengths, coarse to fine; the last must be L
    hidden: int = 16  # channels per dimension inside encoder / decoder
    beta: float = 0.25  # commitment weight
    phi_ratio: float = 0.5  # phi_k(x) = (1 - r) x + r conv(x), as in VAR
    revive_every: int = 200  # training steps between dead-code re-initialisations (0: never)
    lookup: str = "l2"  # nearest-code metric: "l2" (matches magnitude too) or "cosine" (the paper's)


@dataclass
class EncoderConfig:
    """Observation encoder: ``state`` (MLP) or ``visual`` (ResNet-18 per camera + proprioception)."""

    kind: str = "state"  # "state" | "visual"
    obs_horizon: int = 2  # O: observation steps the policy sees
    state_dim: int = 10  # robot state: [x, y, z, r6d(6), gripper]
    env_state_dim: int = 0  # environment state appended to it (object poses; the twin measures them)
    cameras: tuple[str, ...] = ()  # visual only, e.g. ("wrist", "scene")
    image_size: tuple[int, int] = (120, 160)  # (H, W) of incoming frames
    crop_size: tuple[int, int] = (108, 144)  # random crop in training, center crop at eval
    resnet_width: int = 32  # channels of the first ResNet stage (64 = torchvision's full width)
    keypoints: int = 32  # spatial-softmax keypoints per camera
    pretrained_path: str | None = None  # optional trunk state dict (full width only); never required
    hidden: int = 256  # MLP width of the state encoder / fusion MLP
    out_dim: int = 128  # observation embedding size (= transformer conditioning size)

    @property
    def input_state_dim(self) -> int:
        """Width of the state vector the policy sees: robot state + environment state."""
        return self.state_dim + self.env_state_dim


@dataclass
class TransformerConfig:
    """GPT-2-style coarse-to-fine transformer (stage 2)."""

    depth: int = 8
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class TrainConfig:
    """Training loop of both stages (CPU-friendly defaults, overridable from the command line)."""

    batch_size: int = 64
    tokenizer_steps: int = 2000
    policy_steps: int = 5000
    tokenizer_lr: float = 1e-3
    policy_lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    checkpoint_every: int = 500
    log_every: int = 10
    val_fraction: float = 0.1
    val_batches: int = 8  # batches of held-out windows for the end-of-stage reports
    num_workers: int = 0
    seed: int = 0
    # Translation augmentation, metres: each training window is shifted in x and y by a uniform
    # offset in [-s, s] (TCP, object and target positions and the chunk alike). The table is flat,
    # so the shifted scene is as valid as the recorded one; it turns 50 layouts into a continuum.
    shift_augment: float = 0.0


@dataclass
class EnsembleConfig:
    """Test-time shift ensemble, the inference-time counterpart of ``train.shift_augment``.

    The policy is run on ``grid`` x ``grid`` copies of the observation, each with the whole scene
    (TCP, object, target) shifted in x and y by one offset of a grid spanning [-radius, radius]; each
    chunk is shifted back and the chunks are averaged. A model trained with the augmentation should
    answer every copy the same way, up to the shift; where it does not (a layout between the
    demonstrated ones), the average cancels part of the error. This is frame averaging over the
    translation group (Puny et al., "Frame Averaging for Invariant and Equivariant Network Design",
    ICLR 2022), cut to a finite grid. It costs grid**2 inferences per chunk.
    """

    grid: int = 1  # n: an n x n grid of offsets; 1 = off (one inference, no shift)
    radius: float = 0.0  # m, half the grid's side; at most train.shift_augment (what was trained)

    def offsets(self) -> list[tuple[float, float]]:
        """The grid's (dx, dy) offsets in metres, row-major (an odd grid includes (0, 0))."""
        ticks = (
            [0.0]
            if self.grid == 1
            else [-self.radius + 2 * self.radius * i / (self.grid - 1) for i in range(self.grid)]
        )
        return [(dx, dy) for dx in ticks for dy in ticks]


def check_data_options(
    frame: str, train: TrainConfig, encoder: EncoderConfig, ensemble: EnsembleConfig | None = None
) -> None:
    """The frame, the translation augmentation and the shift ensemble, shared by every policy
    family's config.

    The shifts move positions only: the images of a visual policy would not move with them, so a
    shifted window would contradict what the cameras show. An ensemble may only use the shifts the
    model was trained on, and in the relative frame a shift of the whole scene changes nothing."""
    if frame not in ("absolute", "relative"):
        raise ValueError(f"frame must be 'absolute' or 'relative', got {frame!r}")
    if train.shift_augment < 0:
        raise ValueError(f"train.shift_augment must be >= 0 (metres), got {train.shift_augment}")
    if train.shift_augment > 0 and encoder.kind == "visual":
        raise ValueError("train.shift_augment needs a state encoder: images do not move with the shift")
    if ensemble is None or ensemble.grid == 1:
        return
    if ensemble.grid < 1 or ensemble.radius <= 0:
        raise ValueError(
            f"ensemble: grid must be >= 1 and radius > 0 when grid > 1, got grid={ensemble.grid}, "
            f"radius={ensemble.radius}"
        )
    if ensemble.radius > train.shift_augment + 1e-12:
        raise ValueError(
            f"ensemble.radius {ensemble.radius} m exceeds train.shift_augment {train.shift_augment} m: "
            "the model was never trained on such shifts (lower the radius, or set ensemble.grid=1)"
        )
    if frame != "absolute":
        raise ValueError(
            "a shift ensemble needs frame: absolute (relative positions do not move); set ensemble.grid=1"
        )


@dataclass
class CarpConfig:
    """Everything that defines a CARP policy and how it is trained."""

    name: str = "carp_state"
    frame: str = "absolute"  # positions as recorded, or "relative" to the TCP (normalization.py)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        if tok.scales[-1] != tok.latent_len:
            raise ValueError(f"tokenizer.scales must end at latent_len={tok.latent_len}, got {tok.scales}")
        if tok.horizon != 4 * tok.latent_len:
            raise ValueError("tokenizer.horizon must be 4 x latent_len (two stride-2 convolutions)")
        if tok.lookup not in ("l2", "cosine"):
            raise ValueError(f"tokenizer.lookup must be 'l2' or 'cosine', got {tok.lookup!r}")
        if self.encoder.kind not in ("state", "visual"):
            raise ValueError(f"encoder.kind must be 'state' or 'visual', got {self.encoder.kind!r}")
        if self.encoder.kind == "visual" and not self.encoder.cameras:
            raise ValueError("a visual encoder needs at least one camera in encoder.cameras")
        check_data_options(self.frame, self.train, self.encoder, self.ensemble)
        if self.transformer.width % self.transformer.heads:
            raise ValueError("transformer.width must be divisible by transformer.heads")

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CarpConfig:
        """Build from a nested dict; unknown keys raise ValueError naming them."""
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            sub = {
                "tokenizer": TokenizerConfig,
                "encoder": EncoderConfig,
                "transformer": TransformerConfig,
                "train": TrainConfig,
                "ensemble": EnsembleConfig,
            }.get(name)
            kwargs[name] = _build(sub, value or {}, name) if sub else value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> CarpConfig:
        """Load a YAML file, or a shipped variant by name (``state``, ``visual``)."""
        return cls.from_dict(yaml.safe_load(config_path(path).read_text()) or {})


def _build(cls: type, d: dict[str, Any], section: str) -> Any:
    """Dataclass from dict, converting lists to tuples where the default is a tuple."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown keys in config section '{section}': {sorted(unknown)}")
    defaults = cls()
    out = {}
    for k, v in d.items():
        if isinstance(getattr(defaults, k), tuple) and isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return cls(**out)
