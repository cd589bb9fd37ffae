"""What every policy family's configuration shares: the base config and its common sections.

A family (``policies/<name>/configuration_<name>.py``) subclasses ``PolicyConfig`` and adds its
network sections. Every field carries its meaning and its default; a YAML file lists only what
differs from the defaults, and ``carp_policy.yaml_config`` loads it strictly (an unknown key is an
error naming it). The defaults are those of the shipped CARP state configs (``configs/state.yaml``,
``configs/state_env.yaml``); ``test_configs.py`` holds every shipped YAML to them.

Imports no torch: the onboard engine reads these from a manifest.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from carp_policy.normalization import FRAMES

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
class EncoderConfig:
    """Observation encoder: ``state`` (MLP) or ``visual`` (ResNet-18 per camera + proprioception)."""

    kind: str = "state"  # "state" | "visual"
    # O: observation steps the policy sees. A visual encoder reads the state at all O rows and each
    # camera at the newest row only (encoders.VisualEncoder): a proprioceptive history.
    obs_horizon: int = 2
    # Control periods between those steps: rows at t - (O - 1 - i) * obs_stride * dt. 1 = consecutive
    # frames. A longer look back tells apart moments the last 0.1 s cannot: on the cup task, closing
    # on the cup and letting go of it look the same up to 0.4 s back (benchmarks/grasp_confusion.py
    # --data); 0.6 s and more back the gripper was open before the grasp and closed before the
    # release. Costs nothing at inference: the network still sees O rows.
    obs_stride: int = 1
    state_dim: int = 10  # robot state: [x, y, z, r6d(6), gripper]
    env_state_dim: int = 0  # environment state appended to it (object poses; the twin measures them)
    cameras: tuple[str, ...] = ()  # visual only, e.g. ("wrist", "scene")
    image_size: tuple[int, int] = (120, 160)  # (H, W) of incoming frames
    crop_size: tuple[int, int] = (108, 144)  # random crop in training, center crop at eval
    # Colour jitter in training, per image: brightness, contrast and saturation each scaled by a
    # uniform factor in [1 - j, 1 + j] (torchvision ColorJitter's ranges). Counters a policy that keys
    # on the twin's exact colours and lighting, which a real camera will not reproduce. 0 = off.
    color_jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    resnet_width: int = 32  # channels of the first ResNet stage (64 = torchvision's full width)
    keypoints: int = 32  # spatial-softmax keypoints per camera
    # ResNet stages before the keypoint head: 4 (the full trunk, a 1/32-resolution map: 4x5 cells
    # on a 108x144 crop) or 3 (layer3, 1/16: 7x9 cells; encoder 1.5M parameters, not 5.7M). A keypoint is an
    # expectation over those cells: on the twin's cameras the cup's whole demonstrated x range moves
    # it by less than one 1/32 cell in the scene image (benchmarks/camera_pixels.py).
    trunk_stages: int = 4
    pretrained_path: str | None = None  # optional trunk state dict (full width only); never required
    hidden: int = 128  # MLP width of the state encoder / fusion MLP
    out_dim: int = 64  # observation embedding size (= the network's conditioning size)
    # Multi-task: the tasks one model is trained on, in the order of its task embedding's rows (the
    # CARP paper's multi-task setting). Each task's learned embedding is added to the observation
    # embedding; the node selects the row by the task's name. () = a single-task model.
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.obs_horizon < 1 or self.obs_stride < 1:
            raise ValueError(
                f"encoder.obs_horizon and encoder.obs_stride must be >= 1, got {self.obs_horizon} and "
                f"{self.obs_stride}"
            )
        if self.trunk_stages not in (3, 4):
            raise ValueError(f"encoder.trunk_stages must be 3 or 4, got {self.trunk_stages}")

    @property
    def input_state_dim(self) -> int:
        """Width of the state vector the policy sees: robot state + environment state."""
        return self.state_dim + self.env_state_dim

    @property
    def used_cameras(self) -> tuple[str, ...]:
        """The cameras the policy reads (none for a state encoder, whatever ``cameras`` says)."""
        return tuple(self.cameras) if self.kind == "visual" else ()


@dataclass
class TrainConfig:
    """Training loop (CPU-friendly defaults, overridable with ``--set train.KEY=VALUE``)."""

    batch_size: int = 64  # windows per optimiser step
    tokenizer_steps: int = 3000  # stage 1 steps (families with a tokenizer)
    policy_steps: int = 6000  # stage 2 (the policy network) steps
    tokenizer_lr: float = 3e-3  # AdamW peak learning rate of stage 1
    policy_lr: float = 3e-4  # AdamW peak learning rate of stage 2
    weight_decay: float = 0.01  # AdamW weight decay (not on norms, biases, embeddings)
    warmup_steps: int = 200  # linear warmup, then cosine decay to 10% of the peak
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.995  # EMA of the policy weights (what evaluation and export use)
    checkpoint_every: int = 1000  # steps between weight + resume-state writes
    log_every: int = 10  # steps between rows of loss_<stage>.csv
    val_fraction: float = 0.1  # episodes held out for the end-of-stage reports
    val_batches: int = 8  # batches of held-out windows for the end-of-stage reports
    num_workers: int = 0  # DataLoader workers
    seed: int = 0  # seeds the split, the batches and the initial weights
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
    """The frame, the translation augmentation and the shift ensemble, shared by every family.

    The shifts move positions only: the images of a visual policy would not move with them, so a
    shifted window would contradict what the cameras show. An ensemble may only use the shifts the
    model was trained on, and in the relative frame a shift of the whole scene changes nothing."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
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
class PolicyConfig:
    """Fields every family shares: what the model is for and how a node must run it.

    ``task`` (or a multi-task model's ``encoder.tasks``), ``dt``, ``execute_steps`` (with the
    family's chunk horizon, the encoder's cameras and
    image size, and the normalizer's state names) are the contract a node reads from the manifest
    to run a model right (``contract``)."""

    FAMILY: ClassVar[str] = ""  # the registry name of the family (carp_policy.policies)
    MULTI_TASK: ClassVar[bool] = False  # its export feeds a task index (encoder.tasks) to the graphs

    name: str = "policy"  # run / model name (manifest, reports)
    family: str = ""  # the family this config belongs to; the registry key ("" = this class's)
    task: str = ""  # the task the model is trained for (carp_sim.tasks name, e.g. "cup"); "" = any
    dt: float = 0.1  # s, the control period: one action per dt (the demonstrations' rate, 10 Hz)
    execute_steps: int = 8  # steps of each chunk executed before re-planning
    frame: str = "absolute"  # as recorded, "relative" to the TCP, or "relative_xy" (normalization.py)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # observation encoder (encoders.py)
    train: TrainConfig = field(default_factory=TrainConfig)  # training loop (carp-train)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)  # test-time shift ensemble

    def __post_init__(self) -> None:
        if not self.family:
            self.family = self.FAMILY
        if self.family != self.FAMILY:
            raise ValueError(f"{type(self).__name__}.family must be {self.FAMILY!r}, got {self.family!r}")
        enc = self.encoder
        if enc.kind not in ("state", "visual"):
            raise ValueError(f"encoder.kind must be 'state' or 'visual', got {enc.kind!r}")
        if enc.kind == "visual" and not enc.cameras:
            raise ValueError("a visual encoder needs at least one camera in encoder.cameras")
        if len(enc.color_jitter) != 3 or not all(0.0 <= j < 1.0 for j in enc.color_jitter):
            raise ValueError(
                "encoder.color_jitter is [brightness, contrast, saturation], each in [0, 1), "
                f"got {list(enc.color_jitter)}"
            )
        if enc.tasks:
            if not self.MULTI_TASK:
                raise ValueError(
                    f"encoder.tasks (a multi-task model) is not built for the {self.FAMILY} family"
                )
            if len(set(enc.tasks)) != len(enc.tasks) or not all(enc.tasks):
                raise ValueError(f"encoder.tasks must be distinct task names, got {list(enc.tasks)}")
            if self.task and self.task not in enc.tasks:
                raise ValueError(f"task {self.task!r} is not one of encoder.tasks {list(enc.tasks)}")
        if self.dt <= 0:
            raise ValueError(f"dt must be > 0 (seconds), got {self.dt}")
        if not 1 <= self.execute_steps <= self.horizon:
            raise ValueError(
                f"execute_steps must be in 1..{self.horizon} (the chunk), got {self.execute_steps}"
            )
        check_data_options(self.frame, self.train, self.encoder, self.ensemble)

    @property
    def horizon(self) -> int:
        """H, actions per chunk (each family says where it keeps it)."""
        raise NotImplementedError

    @property
    def window(self) -> int:
        """Actions per training window (rows t..t+W-1 of frame t): the chunk, unless a family learns
        from a longer span (Chain-of-Action: the way to the next keyframe)."""
        return self.horizon

    def contract(self, state_names: list[str] | None = None) -> dict[str, Any]:
        """What a node needs to run the model: task, control period, chunk, observation layout."""
        from carp_policy.actions import STATE_NAMES

        enc = self.encoder
        S, E = enc.state_dim, enc.env_state_dim
        names = list(state_names) if state_names and len(state_names) == S + E else None
        env_names = names[S:] if names else [f"env_{i}" for i in range(E)]
        out = {
            "task": self.task,
            "dt": self.dt,
            "horizon": self.horizon,
            "execute_steps": self.execute_steps,
            "obs_horizon": enc.obs_horizon,
            "state_names": STATE_NAMES[:S],
            "env_state_names": env_names,
            "cameras": {c: list(enc.image_size) for c in enc.used_cameras},
        }
        if enc.obs_stride != 1:  # control periods between observation rows (absent: 1, consecutive)
            out["obs_stride"] = enc.obs_stride
        if enc.tasks:  # a multi-task model: the tasks a node may select (single-task contracts lack it)
            out["tasks"] = list(enc.tasks)
        return out

    # ------------------------------------------------------------------ YAML (yaml_config)
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML / JSON."""
        from carp_policy.yaml_config import to_dict

        return to_dict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        from carp_policy.yaml_config import save_yaml

        save_yaml(self, path)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Any:
        """Build from a nested dict; unknown keys raise ValueError naming them (yaml_config)."""
        from carp_policy.yaml_config import from_dict

        return from_dict(cls, d)

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Load a YAML file, or a shipped variant by name (``state``, ``diffusion_visual``, ...)."""
        from carp_policy.yaml_config import load_yaml

        return load_yaml(cls, config_path(path))


@dataclass(frozen=True)
class PolicyFamily:
    """One family's entry in the registry. Module paths are imported on first use, so the registry
    (and the engine through it) needs no torch until a torch part is asked for."""

    name: str  # the registry key, the ``family`` of configs and manifests
    config_class: type[PolicyConfig]  # its configuration dataclass
    modeling: str  # module holding ``Model`` and ``Policy`` (torch)
    export: str  # module holding ``export_graphs`` (torch) ...
    onnx: str  # ... and the module holding ``OnnxRunner`` (numpy + onnxruntime, no torch)

    def _attr(self, module: str, name: str) -> Any:
        return getattr(importlib.import_module(module), name)

    @property
    def model_class(self) -> Any:
        """The ``nn.Module`` training runs (``loss``, ``generate``, ``stages``, stage hooks)."""
        return self._attr(self.modeling, "Model")

    @property
    def policy_class(self) -> Any:
        """The torch ``ChunkPolicy`` (``from_run(run_dir, device)``)."""
        return self._attr(self.modeling, "Policy")

    @property
    def export_graphs(self) -> Any:
        """``export_graphs(policy, spec, out, batch) -> (graphs, manifest extras)``."""
        return self._attr(self.export, "export_graphs")

    @property
    def onnx_runner(self) -> Any:
        """The engine-side runner class (``OnnxRunner(engine, **options)``)."""
        return self._attr(self.onnx, "OnnxRunner")
