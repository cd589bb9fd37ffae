"""The released models give the same chunks as when they were released.

``golden/release_<model>.npz`` holds chunks that ``load_policy`` returned for ``models/cup``,
``models/bowl`` and ``models/cup_visual`` on fixed observations, recorded before the policy code was
reorganised (``golden/record_release_golden.py``; ``bowl`` and ``cup_visual`` re-recorded with their
retrained weights, from code that reproduced the other files). Any refactoring of the inference path
(normalisation, the engine, the shift ensemble, the loader) must reproduce them.

Tolerance: the recording and the check run the same onnxruntime graphs; on one machine the chunks
are bit-identical (measured max |diff| 0). ``ATOL = 1e-6`` (m and rot6d units) leaves room for
onnxruntime builds with other kernels (different CPU features give ~1e-7 at most), and is four
orders of magnitude below anything a robot would notice or a changed formula would produce.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carp_policy.actions import Observation

ROOT = Path(__file__).resolve().parents[4]
GOLDEN = Path(__file__).resolve().parent / "golden"
MODELS = ("cup", "bowl", "cup_visual")
N_OBS = 4
IMAGE_SEED = 1234
ATOL = 1e-6


def _manifest(name: str) -> dict:
    import json

    return json.loads((ROOT / "models" / name / "manifest.json").read_text())


def golden_observations(name: str, state: np.ndarray | None = None, env: np.ndarray | None = None) -> list:
    """N_OBS observations inside the model's normalisation range (state drawn once, images from a
    seeded generator: the files store states only, the images would be 230 kB each)."""
    m = _manifest(name)
    spec, nz = m["observation"], m["normalization"]["observation.state"]
    O, S, E = spec["obs_horizon"], spec["state_dim"], spec.get("env_state_dim", 0)
    lo, hi = np.asarray(nz["min"]), np.asarray(nz["max"])
    if state is None:
        rng = np.random.default_rng(7)
        full = lo + (hi - lo) * rng.uniform(0.05, 0.95, size=(N_OBS, O, S + E))
        state, env = full[..., :S], full[..., S:]
    img_rng = np.random.default_rng(IMAGE_SEED)
    out = []
    for i in range(N_OBS):
        images = {
            c: img_rng.integers(0, 256, size=(O, *spec["image_size"], 3), dtype=np.uint8)
            for c in spec["cameras"]
        }
        out.append(
            Observation(state=state[i], images=images, timestamp=float(i), env_state=env[i] if E else None)
        )
    return out


def run_model(name: str, observations: list) -> dict[str, np.ndarray]:
    """Chunks of the released model as loaded (its own ensemble setting) and without the ensemble."""
    from carp_policy import load_policy
    from carp_policy.policies.base import EnsembleConfig

    path = ROOT / "models" / name
    shipped = load_policy(path, device="cpu")
    bare = load_policy(path, device="cpu", ensemble=EnsembleConfig())
    return {
        "shipped": np.stack([shipped.predict(o).actions for o in observations]),
        "bare": np.stack([bare.predict(o).actions for o in observations]),
    }


@pytest.mark.parametrize("name", MODELS)
def test_release_chunks_unchanged(name: str) -> None:
    path = GOLDEN / f"release_{name}.npz"
    if not (ROOT / "models" / name / "manifest.json").exists():
        pytest.skip(f"models/{name} not in this checkout")
    g = np.load(path)
    E = g["env_state"].shape[-1]
    obs = golden_observations(name, g["state"], g["env_state"] if E else None)
    got = run_model(name, obs)
    for key in ("shipped", "bare"):
        diff = float(np.abs(got[key] - g[key]).max())
        assert diff <= ATOL, f"models/{name} ({key}): chunks moved by {diff:.2e} > {ATOL:.0e}"
