"""The onboard inference engine: an exported model directory run with onnxruntime, no torch.

``OnnxPolicy(model_dir)`` implements ``carp_policy.actions.Policy`` for both exported families
(``manifest["family"]``: ``carp`` or ``diffusion``), with the same observation checks and error
messages as the torch policies.

Load time does all the slow and risky work once: the manifest is checked against the files
(format version, opset, sha256 of every graph) and the graphs against the manifest and the
observation spec (input/output names, shapes, dtypes); sessions are created, every input and output
buffer is allocated once on the device (shapes are static, batch 1) and bound through IO binding,
and the chain is warmed up. ``predict`` then only copies the observation into the input buffers,
runs the sessions in order and copies the 16 actions back: on CUDA, the condition, tokens, f_hat
and the K/V cache stay on the GPU between the scale steps (each graph's inputs are bound to the
previous graph's output buffers).

DP-C: the encoder graph once, then the denoising-step graph in a loop; the DDIM / DDPM update is
done in numpy from the scheduler constants in the manifest (the same formulas as diffusers'
``DDIMScheduler`` (eta = 0) and ``DDPMScheduler`` (``fixed_small``); a test holds them equal).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from carp_policy.actions import (
    ACTION_NAMES,
    ROT6D,
    ActionChunk,
    Observation,
    matrix_to_rot6d,
    rot6d_to_matrix,
    validate_observation,
)
from carp_policy.normalization import Normalizer

SUPPORTED_OPSETS = (17,)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ORT_DTYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "uint8": "tensor(uint8)"}
_NP_DTYPES = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8}
# which earlier output feeds each chained input (CARP: previous graph; "cond": always the first graph)
_CARRY = {"x_in": "x_next", "f_hat": "f_hat_out", "past_k": "present_k", "past_v": "present_v"}


class ModelDirError(ValueError):
    """A model directory that does not match its manifest, or a manifest this engine cannot run."""


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` and check it against the files: format, opset, checksums.

    Raises ``ModelDirError`` naming the first thing that is wrong.
    """
    d = Path(model_dir)
    path = d / MANIFEST
    if not path.exists():
        raise ModelDirError(f"{path} missing: is {d} a carp-export model directory?")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON: {e}") from e
    for key in ("format_version", "family", "opset", "graphs", "observation", "normalization"):
        if key not in m:
            raise ModelDirError(f"{path} lacks '{key}'")
    if m["format_version"] != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format_version {m['format_version']}, this engine reads {FORMAT_VERSION}"
        )
    if m["family"] not in ("carp", "diffusion"):
        raise ModelDirError(f"{path}: unknown policy family {m['family']!r} (carp, diffusion)")
    if m["opset"] not in SUPPORTED_OPSETS:
        raise ModelDirError(f"{path}: opset {m['opset']}, this engine supports {SUPPORTED_OPSETS}")
    for g in m["graphs"] + (m.get("fp16") or {}).get("graphs", []):
        f = d / g["file"]
        if not f.exists():
            raise ModelDirError(f"{f} listed in the manifest is missing")
        if sha256(f) != g.get("sha256"):
            raise ModelDirError(f"{f}: sha256 does not match the manifest (file changed after export)")
        _check_opset(f, m["opset"])
    return m


def _check_opset(path: Path, want: int) -> None:
    """The graph's own default-domain opset must equal the manifest's (needs the onnx package; the
    sha256 check already pins the file the exporter measured, so without onnx this is skipped)."""
    try:
        import onnx
    except ImportError:
        return
    model = onnx.load(str(path), load_external_data=False)
    got = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if got and got[0] != want:
        raise ModelDirError(f"{path.name}: graph opset {got[0]} differs from the manifest's opset {want}")


class OnnxPolicy:
    """An exported CARP or DP-C model behind the ``Policy`` protocol, run with onnxruntime.

    model_dir: a ``carp-export`` output. device: ``"cpu"`` or ``"cuda"`` (where the IO buffers live;
    ``"cuda"`` requires onnxruntime-gpu's CUDA provider to be active). providers: onnxruntime
    providers in order of preference (default: CUDA then CPU for ``"cuda"``, CPU for ``"cpu"``).
    precision: ``"fp32"``, ``"fp16"`` (the fp16 graphs the export verified), or ``"auto"`` (fp16 on
    CUDA when the export kept it, else fp32). sampler / num_inference_steps: DP-C only, override
    the manifest's (``"ddim"`` with any step count, or ``"ddpm"``). seed: DP-C's noise generator.
    """

    def __init__(
        self,
        model_dir: str | Path,
        providers: tuple[str, ...] | list[str] | None = None,
        device: str = "cpu",
        precision: str = "auto",
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        seed: int = 0,
        intra_op_threads: int = 0,
        warmup: int = 3,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.model_dir = Path(model_dir)
        self.manifest = m = load_manifest(self.model_dir)
        self.family: str = m["family"]
        self.spec: dict[str, Any] = m["observation"]
        self.obs_horizon: int = int(self.spec["obs_horizon"])
        self.cameras: tuple[str, ...] = tuple(self.spec["cameras"])
        # rows of every graph (static): 1, or a shift ensemble's copies run in one pass (predict_batch)
        self.batch: int = int(m.get("batch", 1))
        self.normalizer = Normalizer.from_stats(m["normalization"])
        self._state_scale, self._state_offset = self.normalizer.torch_params("state")
        self.device = device
        self._device_type, self._device_id = ("cuda", 0) if device == "cuda" else ("cpu", 0)
        if providers is None:
            providers = (
                ("CUDAExecutionProvider", "CPUExecutionProvider")
                if device == "cuda"
                else ("CPUExecutionProvider",)
            )
        self.precision = self._pick_precision(precision)
        graphs = self._graph_list()
        self._check_obs_spec(graphs[0])

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # onnxruntime's own warnings are about fusions, not about us
        if intra_op_threads:
            so.intra_op_num_threads = intra_op_threads
        available = ort.get_available_providers()
        use = [p for p in providers if p in available]
        if not use:
            raise RuntimeError(
                f"none of the providers {list(providers)} is available (onnxruntime has {available})"
            )
        self.sessions: list[ort.InferenceSession] = []
        for g in graphs:
            sess = ort.InferenceSession(str(self.model_dir / g["file"]), sess_options=so, providers=use)
            _check_io(sess, g)
            self.sessions.append(sess)
        self.providers: list[str] = self.sessions[0].get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise RuntimeError(
                f"device='cuda' but onnxruntime runs these graphs with {self.providers} "
                f"(available: {available}); install onnxruntime-gpu with a matching CUDA/cuDNN, "
                "or use device='cpu'"
            )
        self.stage_names: list[str] = [g.get("stage", g["file"]) for g in graphs]
        self.last_stage_times: list[float] = [0.0] * len(graphs)  # seconds, per graph, of the last predict
        self._bind(graphs)

        if self.family == "diffusion":
            sch = m["scheduler"]
            self._alphas = np.asarray(sch["alphas_cumprod"], dtype=np.float64)
            self._sched = sch
            self.sampler = sampler or sch["sampler"]
            if self.sampler not in ("ddim", "ddpm"):
                raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
            self.num_inference_steps = int(num_inference_steps or sch["num_inference_steps"])
            self.timesteps = diffusion_timesteps(sch, self.sampler, self.num_inference_steps)
            self.horizon = int(m["action"]["horizon"])
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self.warmup(warmup)

    # ------------------------------------------------------------------ loading
    def _pick_precision(self, precision: str) -> str:
        fp16 = self.manifest.get("fp16") or {}
        if precision == "auto":
            return "fp16" if self.device == "cuda" and fp16.get("graphs") and fp16.get("used") else "fp32"
        if precision == "fp16" and not fp16.get("graphs"):
            raise ModelDirError(
                f"{self.model_dir} has no fp16 graphs (export with --fp16; see manifest 'fp16')"
            )
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'fp16' or 'auto', got {precision!r}")
        return precision

    def _graph_list(self) -> list[dict[str, Any]]:
        graphs = list(self.manifest["graphs"])
        if self.precision == "fp16":  # fp16 replaces encoder + scale graphs; the decoder stays fp32
            fp16 = self.manifest["fp16"]["graphs"]
            graphs = [*fp16, *graphs[len(fp16) :]]
        return graphs

    def _check_obs_spec(self, g: dict[str, Any]) -> None:
        """The first graph's inputs must be exactly what the observation spec says the node feeds."""
        O, S = self.obs_horizon, int(self.spec["state_dim"]) + int(self.spec.get("env_state_dim", 0))
        B = self.batch
        want = {"state": {"shape": [B, O, S], "dtype": "float32"}}
        for cam in self.cameras:
            H, W = self.spec["image_size"]
            want[f"image_{cam}"] = {"shape": [B, O, H, W, 3], "dtype": "uint8"}
        if g["inputs"] != want:
            raise ModelDirError(
                f"{g['file']}: graph inputs {g['inputs']} do not match the manifest's observation spec {want}"
            )

    def _bind(self, graphs: list[dict[str, Any]]) -> None:
        """Allocate every buffer once on the device and bind each graph's inputs to earlier outputs."""
        dev, idx = self._device_type, self._device_id

        def alloc(spec: dict[str, Any]) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(
                spec["shape"], _NP_DTYPES[spec["dtype"]], dev, idx
            )

        self._inputs: dict[str, ort.OrtValue] = {}  # host-fed inputs (observation; DP-C sample/timestep)
        self._outputs: list[dict[str, ort.OrtValue]] = []
        self._bindings: list[ort.IOBinding] = []
        for i, (g, sess) in enumerate(zip(graphs, self.sessions)):
            b = sess.io_binding()
            for name, spec in g["inputs"].items():
                if i > 0 and name == "cond":
                    val = self._outputs[0]["cond"]
                elif i > 0 and self.family == "carp" and name in _CARRY:
                    val = self._outputs[i - 1][_CARRY[name]]
                else:
                    val = self._inputs[name] = alloc(spec)
                b.bind_ortvalue_input(name, val)
            outs = {name: alloc(spec) for name, spec in g["outputs"].items()}
            for name, val in outs.items():
                b.bind_ortvalue_output(name, val)
            self._outputs.append(outs)
            self._bindings.append(b)

    # ------------------------------------------------------------------ Policy protocol
    def reset(self) -> None:
        """No state between chunks; DP-C's noise generator restarts from its seed (reproducible episodes)."""
        self._rng = np.random.default_rng(self._seed)

    def warmup(self, runs: int = 3) -> None:
        """Run the chain on a neutral observation (lets onnxruntime allocate and tune once, at load)."""
        mid = (self.normalizer.state_min + self.normalizer.state_max) / 2.0
        images = {
            c: np.zeros((self.obs_horizon, *self.spec["image_size"], 3), np.uint8) for c in self.cameras
        }
        mid = np.tile(mid, (self.obs_horizon, 1))  # (O, state_dim + env_state_dim)
        S, E = int(self.spec["state_dim"]), int(self.spec.get("env_state_dim", 0))
        obs = Observation(state=mid[:, :S], images=images, env_state=mid[:, S:] if E else None)
        for _ in range(runs):
            self._run([obs])
        self.reset()

    def predict(self, observation: Observation, noise: np.ndarray | None = None) -> ActionChunk:
        """Observation (O steps) -> ActionChunk of H actions in physical units, rot6d re-orthonormalised.

        noise: DP-C only, the initial sample x_T (H, A) (default: drawn from the engine's generator).
        Raises ValueError for a malformed observation and for a non-finite output (the chunk is refused).
        """
        t0 = time.perf_counter()
        actions = self._run([observation], noise)  # (B, H, D) normalised float32
        return self._finish(actions[0], observation.timestamp, t0, self._state_now[0])

    def predict_batch(self, observations: list[Observation]) -> list[ActionChunk]:
        """Up to ``batch`` observations in one pass of the graphs -> one chunk each (CARP).

        Every chunk's ``latency_s`` is the time of the whole pass."""
        if not 1 <= len(observations) <= self.batch:
            raise ValueError(f"predict_batch takes 1..{self.batch} observations, got {len(observations)}")
        t0 = time.perf_counter()
        actions = self._run(observations)
        return [
            self._finish(actions[i], o.timestamp, t0, self._state_now[i]) for i, o in enumerate(observations)
        ]

    def predict_with_tokens(self, observation: Observation) -> tuple[ActionChunk, list[np.ndarray]]:
        """CARP only: the chunk and the K greedy token maps (1, D, k) (copied to the host; for checks)."""
        if self.family != "carp":
            raise ValueError("predict_with_tokens is for CARP models")
        t0 = time.perf_counter()
        actions = self._run([observation])
        tokens = [outs["tokens"].numpy()[:1] for outs in self._outputs[:-1]]
        return self._finish(actions[0], observation.timestamp, t0, self._state_now[0]), tokens

    # ------------------------------------------------------------------ internals
    def _finish(self, actions: np.ndarray, timestamp: float, t0: float, state_now: np.ndarray) -> ActionChunk:
        if not np.all(np.isfinite(actions)):
            t, d = np.argwhere(~np.isfinite(actions))[0]
            raise ValueError(
                f"{self.manifest.get('name', 'policy')}: ONNX output is not finite (NaN/inf) at step {t}, "
                f"dim {ACTION_NAMES[d]}: chunk refused"
            )
        actions = self.normalizer.unnormalize_action(actions)
        actions = self.normalizer.actions_from_frame(actions, state_now)
        actions[:, ROT6D] = matrix_to_rot6d(rot6d_to_matrix(actions[:, ROT6D]))
        return ActionChunk(actions=actions, timestamp=timestamp, latency_s=time.perf_counter() - t0)

    def _feed(self, observations: list[Observation]) -> None:
        """Validate the observations and copy them (normalised state, uint8 images) into the input
        buffers, one per row; rows past the last observation repeat it (their output is unused)."""
        rows = [
            validate_observation(
                obs,
                self.obs_horizon,
                int(self.spec["state_dim"]),
                self.cameras,
                self.spec.get("image_size"),
                int(self.spec.get("env_state_dim", 0)),
            )
            for obs in observations
        ]
        rows += [rows[-1]] * (self.batch - len(rows))
        state = np.stack([r[0] for r in rows])  # (B, O, S + E)
        self._state_now = state[:, -1]  # (B, S + E): a relative chunk is an offset from this TCP position
        # the same float32 arithmetic as the torch policies, so both see bit-identical inputs
        state = self.normalizer.state_to_frame(state).astype(np.float32)
        norm = (state - self._state_offset) / self._state_scale
        self._inputs["state"].update_inplace(np.ascontiguousarray(norm, dtype=np.float32))
        for cam in self.cameras:
            img = np.stack([r[1][cam] for r in rows])
            self._inputs[f"image_{cam}"].update_inplace(np.ascontiguousarray(img))

    def _run_graph(self, i: int) -> None:
        t0 = time.perf_counter()
        # synchronous: onnxruntime waits for the device at the end of a run, so the time is honest
        self.sessions[i].run_with_iobinding(self._bindings[i])
        self.last_stage_times[i] += time.perf_counter() - t0

    def _run(self, observations: list[Observation], noise: np.ndarray | None = None) -> np.ndarray:
        """-> (B, H, D) normalised actions, row i for observation i."""
        self._feed(observations)
        self.last_stage_times = [0.0] * len(self.sessions)
        if self.family == "carp":
            for i in range(len(self.sessions)):
                self._run_graph(i)
            return self._outputs[-1]["actions"].numpy()  # (B, H, D), the only device -> host copy
        return self._denoise(noise)[None]

    def _denoise(self, noise: np.ndarray | None) -> np.ndarray:
        """DP-C: encoder once, then the denoising graph in a loop with the numpy scheduler update."""
        A = int(self.manifest["action"]["dim"])
        self._run_graph(0)
        if noise is None:
            x = self._rng.standard_normal((self.horizon, A))
        else:
            x = np.asarray(noise, dtype=np.float64)
            if x.shape != (self.horizon, A):
                raise ValueError(f"noise must have shape ({self.horizon}, {A}), got {x.shape}")
        x = x.astype(np.float32)
        sample, timestep, eps = self._inputs["sample"], self._inputs["timestep"], self._outputs[1]["eps"]
        ts = self.timesteps
        for j, t in enumerate(ts):
            sample.update_inplace(x[None])
            timestep.update_inplace(np.array([t], dtype=np.int64))
            self._run_graph(1)
            prev_t = int(ts[j + 1]) if j + 1 < len(ts) else -1
            var_noise = self._rng.standard_normal(x.shape) if self.sampler == "ddpm" and t > 0 else None
            x = scheduler_step(
                self._sched, self._alphas, self.sampler, eps.numpy()[0], int(t), prev_t, x, var_noise
            )
        return x


def _check_io(sess: ort.InferenceSession, g: dict[str, Any]) -> None:
    """A graph's real inputs/outputs (names, shapes, dtypes) must be what the manifest declares."""
    for kind, got, want in (
        ("input", sess.get_inputs(), g["inputs"]),
        ("output", sess.get_outputs(), g["outputs"]),
    ):
        got_d = {a.name: (list(a.shape), a.type) for a in got}
        want_d = {n: (s["shape"], _ORT_DTYPES[s["dtype"]]) for n, s in want.items()}
        if got_d != want_d:
            raise ModelDirError(f"{g['file']}: {kind}s {got_d} do not match the manifest's {want_d}")


def diffusion_timesteps(sched: dict[str, Any], sampler: str, steps: int) -> np.ndarray:
    """Descending timesteps as diffusers sets them ("leading" spacing); DDPM uses every training step."""
    N = int(sched["num_train_timesteps"])
    if sampler == "ddpm":
        return np.arange(N)[::-1].copy()
    if not 1 <= steps <= N:
        raise ValueError(f"num_inference_steps must be in [1, {N}], got {steps}")
    ratio = N // steps
    return (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + int(sched.get("steps_offset", 0))


def scheduler_step(
    sched: dict[str, Any],
    alphas: np.ndarray,
    sampler: str,
    eps: np.ndarray,
    t: int,
    prev_t: int,
    x: np.ndarray,
    variance_noise: np.ndarray | None = None,
) -> np.ndarray:
    """x_t -> x_prev for epsilon prediction: DDIM with eta = 0, or DDPM with ``fixed_small`` variance.

    Written out here (rather than calling diffusers) so the robot PC needs only numpy; the formulas
    are diffusers' (DDIMScheduler.step / DDPMScheduler.step), and a test checks them against it.
    """
    a_t = alphas[t]
    a_prev = alphas[prev_t] if prev_t >= 0 else 1.0  # set_alpha_to_one / DDPM's "one"
    x64, eps64 = x.astype(np.float64), eps.astype(np.float64)
    x0 = (x64 - np.sqrt(1.0 - a_t) * eps64) / np.sqrt(a_t)
    if sched["clip_sample"]:
        r = sched["clip_sample_range"]
        x0 = np.clip(x0, -r, r)
    if sampler == "ddim":
        prev = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps64
    else:
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha
        prev = (np.sqrt(a_prev) * cur_beta / (1.0 - a_t)) * x0 + (
            np.sqrt(cur_alpha) * (1.0 - a_prev) / (1.0 - a_t)
        ) * x64
        if t > 0:
            if variance_noise is None:
                raise ValueError("DDPM steps with t > 0 need variance noise")
            var = max((1.0 - a_prev) / (1.0 - a_t) * cur_beta, 1e-20)
            prev = prev + np.sqrt(var) * variance_noise
    return prev.astype(np.float32)
