"""How the engine runs an exported Chain-of-Action model: the encoder graph (which also decodes the
keyframe), then the step graph once per chain step until the stop rule (chain.py) ends the chain.

The KV cache never leaves the device: the step graph has two IO bindings that swap their buffers
(step 1 reads the encoder graph's outputs and writes its own; step 2 reads those and writes into
the encoder graph's; and so on), so no step copies the cache. Each step's action (10 numbers) comes
to the host for the stop rule. numpy + onnxruntime only (the robot PC needs no torch)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from carp_policy.normalization import Normalizer
from carp_policy.policies.coa.chain import ChainStop, chain_to_chunk
from carp_policy.policies.coa.configuration_coa import CoaConfig
from carp_policy.processor import EncodedObservations

_SWAP = ("action", "present_k", "present_v")  # the step outputs that feed its next run
_FEEDS = {"action_in": "action", "past_k": "present_k", "past_v": "present_v"}


class OnnxRunner:
    """Runner of a ``ChunkPolicy`` over ``carp_policy.engine.OnnxGraphs``.

    chain_len: decode exactly this many steps instead of stopping dynamically (benchmarks)."""

    # the step graph's first binding reads the encoder graph's outputs
    CARRY: ClassVar[dict[str, str]] = {"cond": "cond", **_FEEDS}

    def __init__(self, graphs: Any, manifest: dict[str, Any], chain_len: int | None = None) -> None:
        self.graphs = graphs
        self.batch = 1
        self.config = CoaConfig.from_dict(manifest["config"])
        self.horizon, self.max_len = self.config.horizon, self.config.chain.max_len
        if chain_len is not None and not 1 <= chain_len <= self.max_len:
            raise ValueError(f"chain_len must be in 1..{self.max_len}, got {chain_len}")
        self.chain_len = chain_len
        scale, _ = Normalizer.from_stats(manifest["normalization"])._params("action", np.zeros(1))
        self.scale = np.asarray(scale, dtype=np.float64)
        # the second binding: inputs from the step graph's outputs, outputs into the encoder graph's
        g = graphs
        obs_out, step_out = g.outputs[0], g.outputs[1]
        sess = g.sessions[1]
        b = sess.io_binding()
        b.bind_ortvalue_input("cond", obs_out["cond"])
        b.bind_ortvalue_input("pos", g.inputs["pos"])
        for name, src in _FEEDS.items():
            b.bind_ortvalue_input(name, step_out[src])
        for name in _SWAP:
            b.bind_ortvalue_output(name, obs_out[name])
        self._bindings = (g._bindings[1], b)  # step i (>= 1) uses binding (i - 1) % 2
        self._written = (step_out, obs_out)  # ... and writes these outputs

    def reset(self) -> None:
        """Chains keep nothing between chunks."""

    def _step(self, i: int) -> np.ndarray:
        g = self.graphs
        g.inputs["pos"].update_inplace(np.array([i], dtype=np.int64))
        t0 = time.perf_counter()
        g.sessions[1].run_with_iobinding(self._bindings[(i - 1) % 2])
        g.last_stage_times[1] += time.perf_counter() - t0
        return self._written[(i - 1) % 2]["action"].numpy()

    def run(self, obs: EncodedObservations, **kw: Any) -> np.ndarray:
        """-> (1, H, D) normalised chunk: the decoded chain flipped forward (the only host reads are
        each step's action)."""
        if kw:
            raise TypeError(f"Chain-of-Action takes no run options, got {sorted(kw)}")
        g = self.graphs
        with g.lock:
            g.feed(obs, 1)
            g.start_run()
            g.run_graph(0)
            steps = [g.outputs[0]["action"].numpy().copy()]  # (1, D): the keyframe
            stop = ChainStop(obs.action_now[:1], self.scale, self.config.chain)
            fixed = self.chain_len
            done = stop.update(steps[0]) if fixed is None else None
            n = self.max_len if fixed is None else fixed
            for i in range(1, n):
                if fixed is None and done.all():
                    break
                steps.append(self._step(i).copy())
                if fixed is None:
                    done = stop.update(steps[-1])
        chain = np.concatenate(steps)  # (n_decoded, D)
        length = int(stop.length[0]) if fixed is None else fixed
        return chain_to_chunk(chain, length, self.horizon)[None]
