"""Where a visual CARP loses the aim: the encoder or the transformer? Measured on the first frame of
every demonstration, the frame where the first chunk decides where the arm goes.

    .venv/bin/python benchmarks/start_frame_probe.py --data data/cup200 \
        --run LABEL=runs/cup_visual_relxy200 [--run LABEL=DIR ...] \
        [--out benchmarks/results/start_frame_probe_cup.json]

Per run (a ``carp-train`` run directory of a visual CARP; its EMA weights):
- **Encoder**: a linear probe (ridge regression, 5-fold cross-validation over the demonstrations)
  that reads the object's offset from the TCP (x, y) out of the observation embedding the
  transformer is conditioned on, and out of each camera's keypoints alone. R^2 near 1 and an error
  of a few mm: the embedding carries where the object is.
- **Transformer**: with the demonstration's own first chunk as the target (teacher forcing), the
  probability the model gives each position dimension's scale-1 token (the chunk's mean, where it
  goes) and its top-1 accuracy; and how many distinct codes those targets use. A model that read
  the embedding would give its own training targets high probability. (Soft scale-1 targets,
  ``transformer.coarse_label_sigma``, spread the probability over near-identical codes on purpose:
  compare such runs by the next item.)
- **The chunk**: the chunk the policy generates from that frame, with the scale-1 tokens picked
  by argmax and by the codebook mean (``transformer.coarse_decode``); per axis, the correlation
  over the demonstrations between where it ends (from the TCP) and where the demonstration's chunk
  ends, and the RMS difference in mm.
The probe is linear on purpose: it says what the embedding holds in a form the transformer's first
layer could use, not what a bigger network could extract. No GPU; a few minutes per run for 200
demonstrations (decoding their videos). Writes JSON with the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import machine
import numpy as np

AXES = ("x", "y", "z")


def ridge_cv(X: np.ndarray, y: np.ndarray, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Cross-validated ridge regression of y (N, k) on X (N, F): (R^2 (k,), RMSE (k,)) at the best of a
    few regularisation strengths (the same strength for every fold)."""
    best = None
    for lam in (1e-3, 1e-2, 1e-1, 1.0):
        pred = np.zeros_like(y)
        for f in range(folds):
            test = np.arange(len(y)) % folds == f
            mu, sd = X[~test].mean(0), X[~test].std(0) + 1e-3  # floor: constant features stay finite
            Xn = np.c_[(X - mu) / sd, np.ones(len(X))]
            A = Xn[~test]
            w = np.linalg.solve(A.T @ A + lam * len(A) * np.eye(A.shape[1]), A.T @ y[~test])
            pred[test] = Xn[test] @ w
        r2 = 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
        rmse = np.sqrt(((pred - y) ** 2).mean(0))
        if best is None or r2.sum() > best[0].sum():
            best = (r2, rmse)
    return best


def probe_run(run: str, data: str, frame: int, episodes: int | None = None) -> dict:
    """The encoder probe, the scale-1 token statistics and the chunk's end of one run at ``frame`` of
    the first ``episodes`` demonstrations (None: all)."""
    import torch

    from carp_policy.actions import Observation
    from carp_policy.dataset import EpisodeDataset, KeyMap
    from carp_policy.dataset.format import ENV_STATE_KEY
    from carp_policy.policies.carp.modeling_carp import CarpPolicy

    policy = CarpPolicy.from_run(run)
    model, enc = policy.model, policy.model.encoder
    if not policy.cameras:
        raise SystemExit(f"{run} is not a visual policy (no cameras): nothing to probe")
    ds = EpisodeDataset(data, keymap=KeyMap(env_state_key=ENV_STATE_KEY))
    obj = ds.state_names.index("object_x")
    S, H = policy.processor.state_dim, model.cfg.tokenizer.horizon
    feats: dict[str, list[np.ndarray]] = {c: [] for c in policy.cameras} | {"embedding": []}
    offsets, p_target, top1, targets, demo_ends = [], [], [], [], []
    ends: dict[str, list[np.ndarray]] = {"argmax": [], "expected": []}
    trained_decode = model.cfg.transformer.coarse_decode
    for e in range(len(ds) if episodes is None else min(episodes, len(ds))):
        ep = ds.episode(e)
        ob = Observation(state=ep.state[frame, :S], images={c: ep.images[c][frame] for c in policy.cameras})
        encoded = policy.processor.encode([ob.with_horizon()])
        batch = policy.runner.batch_tensors(encoded)
        rows = np.clip(np.arange(frame, frame + H), None, len(ep.action) - 1)
        actions = policy.processor.normalizer.normalize_action(ep.action[rows][None], encoded.state_now)
        with torch.no_grad():
            for cam in policy.cameras:
                feats[cam].append(enc.keypoints(cam, batch["images"][cam]).numpy())
            cond = enc(batch)  # (1, E)
            feats["embedding"].append(cond.numpy())
            tokens = model.tokenizer.encode(torch.as_tensor(actions, dtype=torch.float32))
            logits = model.gpt(cond, model.tokenizer.teacher_forcing_inputs(tokens))[0, :3]  # scale 1: x y z
        t1 = tokens[0][0, :3, 0]  # (3,) the scale-1 targets of x, y, z
        p_target.append(logits.softmax(-1)[torch.arange(3), t1].numpy())
        top1.append((logits.argmax(-1) == t1).numpy())
        targets.append(t1.numpy())
        offsets.append(ep.state[frame, obj : obj + 2] - ep.state[frame, :2])
        for decode, decoded_ends in ends.items():
            model.cfg.transformer.coarse_decode = decode
            decoded_ends.append(policy.predict(ob).actions[-1, :2] - ep.state[frame, :2])
        model.cfg.transformer.coarse_decode = trained_decode
        demo_ends.append(ep.action[rows[-1], :2] - ep.state[frame, :2])
    y = np.array(offsets)
    probe = {}
    for name, values in feats.items():
        r2, rmse = ridge_cv(np.concatenate(values), y)
        probe[name] = {f"r2_{a}": float(r) for a, r in zip("xy", r2)} | {
            f"rmse_{a}_mm": float(v) * 1e3 for a, v in zip("xy", rmse)
        }
    p_target, top1, targets = np.array(p_target), np.array(top1), np.array(targets)
    demo_ends = np.array(demo_ends)
    return {
        "run": run,
        "object_offset_std_mm": {a: float(s) * 1e3 for a, s in zip("xy", y.std(0))},
        "linear_probe": probe,
        "scale1_token": {
            a: {
                "mean_p_target": float(p_target[:, i].mean()),
                "top1_accuracy": float(top1[:, i].mean()),
                "distinct_target_codes": len(np.unique(targets[:, i])),
            }
            for i, a in enumerate(AXES)
        },
        "chunk_end": {decode: _end_stats(np.array(e), demo_ends) for decode, e in ends.items()},
    }


def _end_stats(ends: np.ndarray, demo_ends: np.ndarray) -> dict:
    """Per axis: correlation and RMS difference (mm) of the generated chunks' ends (N, 2) against the
    demonstrations' (N, 2), and the spread of each."""
    return {
        a: {
            "correlation": float(np.corrcoef(ends[:, i], demo_ends[:, i])[0, 1]),
            "rms_error_mm": float(np.sqrt(((ends[:, i] - demo_ends[:, i]) ** 2).mean()) * 1e3),
            "std_mm": float(ends[:, i].std() * 1e3),
            "demo_std_mm": float(demo_ends[:, i].std() * 1e3),
        }
        for i, a in enumerate("xy")
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the demonstrations the runs were trained on")
    p.add_argument(
        "--run", action="append", required=True, help="[LABEL=]carp-train run directory (repeatable)"
    )
    p.add_argument("--frame", type=int, default=0, help="which frame of each demonstration (0: the start)")
    p.add_argument("--episodes", type=int, help="only the first N demonstrations (default: all)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result: dict = {"machine": machine.machine_info(), "data": args.data, "frame": args.frame}
    result.update(episodes=args.episodes, runs={})
    for item in args.run:
        label, _, run = item.rpartition("=")
        r = result["runs"][label or run] = probe_run(run, args.data, args.frame, args.episodes)
        emb, tok = r["linear_probe"]["embedding"], r["scale1_token"]
        tokens = ", ".join(
            f"{a} {tok[a]['mean_p_target']:.2f} (top-1 {tok[a]['top1_accuracy']:.2f})" for a in AXES
        )
        print(
            f"{label or run}: embedding -> object offset R^2 x {emb['r2_x']:.2f} y {emb['r2_y']:.2f} "
            f"(RMSE {emb['rmse_x_mm']:.1f} / {emb['rmse_y_mm']:.1f} mm); scale-1 token p(target) {tokens}"
        )
        for decode, end in r["chunk_end"].items():
            ends = ", ".join(
                f"{a} corr. {end[a]['correlation']:.2f}, RMS {end[a]['rms_error_mm']:.1f} mm, "
                f"std {end[a]['std_mm']:.1f} (demos {end[a]['demo_std_mm']:.1f})"
                for a in "xy"
            )
            print(f"  chunk's end vs the demonstration's ({decode} scale 1): {ends}")
        for cam in (k for k in r["linear_probe"] if k != "embedding"):
            c = r["linear_probe"][cam]
            print(f"  {cam} keypoints alone: R^2 x {c['r2_x']:.2f} y {c['r2_y']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
