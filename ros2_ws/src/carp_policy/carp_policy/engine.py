"""The onboard inference engine: an exported model directory run with onnxruntime, no torch.

``OnnxPolicy(model_dir)`` is the shared ``ChunkPolicy`` (policies/policy.py: the same observation
checks, normalisation and chunk decoding as the torch policies) with the exported graphs as its
runner; each family says how its graphs are chained (``policies/<family>/onnx_<family>.py``).

Load time does all the slow and risky work once: the manifest is checked against the files
(format version, family, opset, sha256 of every graph; ``carp_policy.manifest``) and the graphs
against the manifest and the observation spec (input/output names, shapes, dtypes); sessions are
created, every input and output buffer is allocated once on the device (shapes are static) and bound
through IO binding, and the chain is warmed up. A run then only copies the observation into the
input buffers, runs the sessions in order and copies the actions back: on CUDA, the intermediate
tensors stay on the GPU between graphs (each graph's inputs are bound to earlier output buffers).

Re-entrant: the bound buffers are the engine's one mutable state, so a run (feed, graphs, read
back) holds ``OnnxGraphs.lock``; two threads get their own chunks, one after the other.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from carp_policy.actions import ACTION_NAMES, Observation
from carp_policy.manifest import MANIFEST, ModelDirError, load_manifest, sha256  # noqa: F401 (re-exported)
from carp_policy.normalization import Normalizer
from carp_policy.policies import get_family
from carp_policy.policies.policy import ChunkPolicy
from carp_policy.processor import EncodedObservations

_ORT_DTYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "uint8": "tensor(uint8)"}
_NP_DTYPES = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8}


class OnnxGraphs:
    """The sessions of one model directory with every buffer allocated once and bound.

    carry: input name -> the output name that feeds it, taken from the nearest earlier graph that
    produces it (e.g. CARP's ``past_k`` <- the previous scale's ``present_k``; ``cond`` <- the
    encoder's). Other inputs are fed from the host (``inputs``)."""

    def __init__(
        self,
        model_dir: Path,
        graphs: list[dict[str, Any]],
        providers: tuple[str, ...] | list[str],
        device: str,
        intra_op_threads: int,
        carry: dict[str, str],
        spin: bool = True,
    ) -> None:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # onnxruntime's own warnings are about fusions, not about us
        if intra_op_threads:
            so.intra_op_num_threads = intra_op_threads
        if not spin:  # idle pool threads sleep at once instead of busy-waiting for the next run
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        use = [p for p in providers if p in available]
        if not use:
            raise RuntimeError(
                f"none of the providers {list(providers)} is available (onnxruntime has {available})"
            )
        self.sessions: list[ort.InferenceSession] = []
        for g in graphs:
            sess = ort.InferenceSession(str(model_dir / g["file"]), sess_options=so, providers=use)
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
        self.last_stage_times: list[float] = [0.0] * len(graphs)  # s per graph, of the last run
        self.lock = threading.Lock()
        self._bind(graphs, device, carry)

    def _bind(self, graphs: list[dict[str, Any]], device: str, carry: dict[str, str]) -> None:
        """Allocate every buffer once on the device and bind each graph's inputs to earlier outputs."""
        dev = "cuda" if device == "cuda" else "cpu"

        def alloc(spec: dict[str, Any]) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(spec["shape"], _NP_DTYPES[spec["dtype"]], dev, 0)

        self.inputs: dict[str, ort.OrtValue] = {}  # host-fed inputs (observation; DP-C sample/timestep)
        self.outputs: list[dict[str, ort.OrtValue]] = []
        self._bindings: list[ort.IOBinding] = []
        for g, sess in zip(graphs, self.sessions):
            b = sess.io_binding()
            for name, spec in g["inputs"].items():
                src = carry.get(name)
                producer = next((o for o in reversed(self.outputs) if src in o), None) if src else None
                val = producer[src] if producer is not None else None
                if val is None:
                    val = self.inputs[name] = alloc(spec)
                b.bind_ortvalue_input(name, val)
            outs = {name: alloc(spec) for name, spec in g["outputs"].items()}
            for name, val in outs.items():
                b.bind_ortvalue_output(name, val)
            self.outputs.append(outs)
            self._bindings.append(b)

    def feed(self, obs: EncodedObservations, batch: int) -> None:
        """Copy encoded observations into the input buffers, one per row; rows past the last
        observation repeat it (their output is unused)."""
        n = obs.state.shape[0]
        pad = [n - 1] * (batch - n)
        state = obs.state if not pad else np.concatenate([obs.state, obs.state[pad]])
        self.inputs["state"].update_inplace(np.ascontiguousarray(state, dtype=np.float32))
        for cam, img in obs.images.items():
            img = img if not pad else np.concatenate([img, img[pad]])
            self.inputs[f"image_{cam}"].update_inplace(np.ascontiguousarray(img))
        if obs.task is not None:  # a multi-task model's task index per row
            task = obs.task if not pad else np.concatenate([obs.task, obs.task[pad]])
            self.inputs["task"].update_inplace(np.ascontiguousarray(task, dtype=np.int64))
        if "action_now" in self.inputs:  # the current pose as a normalised action (CARP's anchored head)
            now = obs.action_now if not pad else np.concatenate([obs.action_now, obs.action_now[pad]])
            self.inputs["action_now"].update_inplace(np.ascontiguousarray(now, dtype=np.float32))

    def run_graph(self, i: int) -> None:
        t0 = time.perf_counter()
        # synchronous: onnxruntime waits for the device at the end of a run, so the time is honest
        self.sessions[i].run_with_iobinding(self._bindings[i])
        self.last_stage_times[i] += time.perf_counter() - t0

    def start_run(self) -> None:
        self.last_stage_times = [0.0] * len(self.sessions)


class OnnxPolicy(ChunkPolicy):
    """An exported model (any registered family) behind the ``Policy`` protocol, run with onnxruntime.

    model_dir: a ``carp-export`` output. device: ``"cpu"`` or ``"cuda"`` (where the IO buffers live;
    ``"cuda"`` requires onnxruntime-gpu's CUDA provider to be active). providers: onnxruntime
    providers in order of preference (default: CUDA then CPU for ``"cuda"``, CPU for ``"cpu"``).
    precision: ``"fp32"``, ``"fp16"`` (the fp16 graphs the export verified), or ``"auto"`` (fp16 on
    CUDA when the export kept it, else fp32). spin: onnxruntime's pool threads busy-wait between
    runs (its default, a little faster alone); False lets them sleep, for a process that shares the
    CPU with a servo loop and cameras (on this 2-core machine the spinning starved the twin's camera
    threads past the 100 ms age limit). options: the family runner's (DP-C: ``sampler``,
    ``num_inference_steps``, ``seed``).
    """

    def __init__(
        self,
        model_dir: str | Path,
        providers: tuple[str, ...] | list[str] | None = None,
        device: str = "cpu",
        precision: str = "auto",
        intra_op_threads: int = 0,
        warmup: int = 3,
        spin: bool = True,
        **options: Any,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.model_dir = Path(model_dir)
        self.manifest = m = load_manifest(self.model_dir)
        self.family: str = m["family"]
        family = get_family(self.family)
        self.spec: dict[str, Any] = m["observation"]
        self.device = device
        if providers is None:
            providers = (
                ("CUDAExecutionProvider", "CPUExecutionProvider")
                if device == "cuda"
                else ("CPUExecutionProvider",)
            )
        self.precision = self._pick_precision(precision)
        graph_list = self._graph_list()
        self._check_obs_spec(graph_list[0])
        runner_class = family.onnx_runner
        self.graphs = OnnxGraphs(
            self.model_dir, graph_list, providers, device, intra_op_threads, runner_class.CARRY, spin
        )
        self.providers: list[str] = self.graphs.providers
        self.stage_names: list[str] = self.graphs.stage_names
        config = family.config_class.from_dict(m["config"])
        super().__init__(
            config, Normalizer.from_stats(m["normalization"]), runner_class(self.graphs, m, **options)
        )
        self.warmup(warmup)

    @property
    def last_stage_times(self) -> list[float]:
        """Seconds per graph of the last completed run (diagnostics)."""
        return self.graphs.last_stage_times

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
        if self.precision == "fp16":  # fp16 replaces the first graphs (CARP: encoder + scales)
            fp16 = self.manifest["fp16"]["graphs"]
            graphs = [*fp16, *graphs[len(fp16) :]]
        return graphs

    def _check_obs_spec(self, g: dict[str, Any]) -> None:
        """The first graph's inputs must be exactly what the observation spec says the node feeds."""
        O, S = (
            int(self.spec["obs_horizon"]),
            int(self.spec["state_dim"]) + int(self.spec.get("env_state_dim", 0)),
        )
        B = int(self.manifest.get("batch", 1))
        want = {"state": {"shape": [B, O, S], "dtype": "float32"}}
        for cam in self.spec["cameras"]:
            H, W = self.spec["image_size"]
            want[f"image_{cam}"] = {"shape": [B, O, H, W, 3], "dtype": "uint8"}
        if self.spec.get("tasks"):
            want["task"] = {"shape": [B], "dtype": "int64"}
        if "action_now" in g["inputs"]:  # derived from the state by the processor, never fed by a node
            want["action_now"] = {"shape": [B, len(ACTION_NAMES)], "dtype": "float32"}
        if g["inputs"] != want:
            raise ModelDirError(
                f"{g['file']}: graph inputs {g['inputs']} do not match the manifest's observation spec {want}"
            )

    # ------------------------------------------------------------------ Policy protocol
    def warmup(self, runs: int = 3) -> None:
        """Run the chain on a neutral observation (lets onnxruntime allocate and tune once, at load)."""
        nz = self.normalizer
        mid = np.tile((nz.state_min + nz.state_max) / 2.0, (self.obs_horizon, 1))  # (O, S + E)
        images = {
            c: np.zeros((self.obs_horizon, *self.spec["image_size"], 3), np.uint8) for c in self.cameras
        }
        S, E = int(self.spec["state_dim"]), int(self.spec.get("env_state_dim", 0))
        obs = Observation(state=mid[:, :S], images=images, env_state=mid[:, S:] if E else None)
        enc = self.processor.encode([obs], task_index=0)  # any task row will do (multi-task models)
        for _ in range(runs):  # the graphs only: a refused chunk is refused at predict, not at load
            self.runner.run(enc)
        self.reset()

    def predict_with_tokens(self, observation: Observation) -> tuple[Any, list[np.ndarray]]:
        """CARP only: the chunk and the K greedy token maps (1, D, k) (copied to the host; for checks)."""
        if not hasattr(self.runner, "run_with_tokens"):
            raise ValueError("predict_with_tokens is for CARP models")
        from carp_policy.actions import ActionChunk

        enc = self.processor.encode([observation])
        actions, tokens = self.runner.run_with_tokens(enc)
        chunk = ActionChunk(self.processor.decode(actions[0], enc.state_now[0]), observation.timestamp)
        return chunk, tokens


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
