"""Record the released models' chunks on fixed observations (run once, from unmodified code).

    python ros2_ws/src/carp_policy/test/golden/record_release_golden.py [MODEL ...]

Writes ``release_<model>.npz`` next to this file: the observations (state, env_state; images are
regenerated from ``IMAGE_SEED``) and the chunks ``load_policy`` returned, with the shift ensemble
the model ships with and without it. ``test_release_golden.py`` holds later code to them. Name the
models to record (default: all); re-record a model only when it is re-released (new weights), from
code that reproduces every other model's file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from test_release_golden import MODELS, golden_observations, run_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; the golden models are {list(MODELS)}")
    for name in names:
        obs = golden_observations(name)
        chunks = run_model(name, obs)
        np.savez_compressed(
            HERE / f"release_{name}.npz",
            state=np.stack([o.state for o in obs]),
            env_state=np.stack(
                [o.env_state if o.env_state is not None else np.zeros((len(o.state), 0)) for o in obs]
            ),
            **chunks,
        )
        print(name, {k: v.shape for k, v in chunks.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
