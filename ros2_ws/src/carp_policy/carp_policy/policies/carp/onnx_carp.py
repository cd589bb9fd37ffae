"""How the engine runs an exported CARP model: the K + 1 graphs in order (export_carp.py), each
scale's inputs bound to the previous graph's outputs, one device -> host copy at the end.

numpy + onnxruntime only (the robot PC needs no torch)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from carp_policy.processor import EncodedObservations


class OnnxRunner:
    """Runner of a ``ChunkPolicy`` over ``carp_policy.engine.OnnxGraphs``."""

    # which earlier output feeds each chained input (the previous graph's; "cond": the encoder's)
    CARRY: ClassVar[dict[str, str]] = {
        "cond": "cond",
        "x_in": "x_next",
        "f_hat": "f_hat_out",
        "past_k": "present_k",
        "past_v": "present_v",
    }

    def __init__(self, graphs: Any, manifest: dict[str, Any]) -> None:
        self.graphs = graphs
        self.batch = int(manifest.get("batch", 1))  # static rows: a shift ensemble's copies in one pass

    def _run(self, obs: EncodedObservations) -> None:
        g = self.graphs
        g.feed(obs, self.batch)
        g.start_run()
        for i in range(len(g.sessions)):
            g.run_graph(i)

    def run(self, obs: EncodedObservations, **kw: Any) -> np.ndarray:
        """-> (B, H, D) normalised actions (the only device -> host copy)."""
        if kw:
            raise TypeError(f"CARP takes no run options, got {sorted(kw)}")
        with self.graphs.lock:
            self._run(obs)
            return self.graphs.outputs[-1]["actions"].numpy().copy()

    def run_with_tokens(self, obs: EncodedObservations) -> tuple[np.ndarray, list[np.ndarray]]:
        """The actions and the K token maps of row 0 (1, D, k) (for checks)."""
        with self.graphs.lock:
            self._run(obs)
            tokens = [outs["tokens"].numpy()[:1].copy() for outs in self.graphs.outputs[:-1]]
            return self.graphs.outputs[-1]["actions"].numpy().copy(), tokens

    def reset(self) -> None:
        """CARP keeps no state between chunks."""
