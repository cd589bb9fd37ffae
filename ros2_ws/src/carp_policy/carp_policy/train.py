"""``carp-train``: train the CARP tokenizer (stage 1) and transformer (stage 2) from an episode dataset.

    carp-train --config state --dataset DATA_DIR --out runs/cup_state            # both stages
    carp-train --config visual --dataset DATA_DIR --out runs/cup_visual --stage tokenizer
    carp-train --config state --dataset synthetic --out /tmp/smoke --tokenizer-steps 200 --policy-steps 200
    carp-train --config state_env --dataset cup=data/cup --dataset bowl=data/bowl --out runs/multi
        # one multi-task model: a task embedding per dataset (encoder.tasks)

A run directory holds: ``config.yaml`` (the resolved config), ``normalization.json``,
``tokenizer.safetensors``, ``policy.safetensors`` (EMA weights of encoder + transformer: what
evaluation and export use), ``train_state_<stage>.pt`` (raw weights, optimizer, schedule: for
``--resume``), ``loss_<stage>.csv``, ``loss_curves.png``, ``tokenizer_report.json`` and
``policy_report.json``. The loop is a plain readable loop: AdamW, linear warmup + cosine decay,
gradient clipping, bf16 autocast for the policy stage on CUDA.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from carp_policy.actions import GRIPPER, POS, ROT6D, rotation_error_deg
from carp_policy.cli import UserError, add_device_argument, resolve_device, run_main
from carp_policy.normalization import Normalizer
from carp_policy.policies import PolicyConfig, get_family
from carp_policy.policies import load_config as _load_config
from carp_policy.policies.carp.modeling_carp import count_parameters


# ----------------------------------------------------------------------------- data
def parse_datasets(specs: list[str]) -> tuple[list[str], list[str]]:
    """``--dataset`` values -> (directories, task names). One plain ``DIR`` is a single-task run (no
    names); ``TASK=DIR`` values, one per task, make a multi-task run."""
    named = [s.partition("=") for s in specs]
    if len(specs) == 1 and not named[0][1]:
        return list(specs), []
    if not all(sep and task and d for task, sep, d in named):
        raise UserError(
            f"more than one --dataset needs TASK=DIR for each (e.g. --dataset cup=data/cup "
            f"--dataset bowl=data/bowl), got {specs}"
        )
    return [d for _, _, d in named], [t for t, _, _ in named]


def open_dataset(
    spec: str | list[str], cfg: PolicyConfig, seed: int
) -> tuple[Dataset, Dataset, Dataset, Normalizer, Any]:
    """Dataset directory (or ``synthetic[:N]``), or one directory per task of ``encoder.tasks`` ->
    (train windows, val windows, train action-only windows, normalizer, episodes). Images are only
    loaded where the encoder needs them. A multi-task model's split holds out episodes of every task."""
    enc = cfg.encoder
    dirs = [spec] if isinstance(spec, str) else list(spec)
    where = ", ".join(dirs)
    cams = list(enc.cameras) if enc.kind == "visual" else []
    if enc.tasks and len(dirs) != len(enc.tasks):
        raise ValueError(f"encoder.tasks {list(enc.tasks)} needs one dataset per task, got {dirs}")
    if not enc.tasks and len(dirs) != 1:
        raise ValueError(f"a single-task model reads one dataset, got {dirs}")
    if dirs[0].startswith("synthetic") and not enc.tasks:
        from carp_policy.synthetic import SyntheticEpisodes, SyntheticWindows, split_episodes

        n = int(dirs[0].split(":")[1]) if ":" in dirs[0] else 20
        size, env_dim = tuple(enc.image_size), enc.env_state_dim
        ds = SyntheticEpisodes(n, seed=seed, image_size=size, cameras=tuple(cams), env_state_dim=env_dim)
        windows, parts = SyntheticWindows, [ds]
    else:
        from carp_policy.dataset import (
            EpisodeDataset,
            KeyMap,
            MultiTaskEpisodes,
            WindowDataset,
            split_episodes,
        )
        from carp_policy.dataset.format import ENV_STATE_KEY

        keymap = KeyMap(env_state_key=ENV_STATE_KEY) if enc.env_state_dim else None
        parts = []
        for d in dirs:
            if not Path(d).is_dir():
                raise FileNotFoundError(f"dataset directory not found: {d}")
            parts.append(EpisodeDataset(d, keymap=keymap, image_size=tuple(enc.image_size) if cams else None))
        ds = MultiTaskEpisodes(parts, list(enc.tasks)) if enc.tasks else parts[0]
        windows = WindowDataset
        missing = [c for c in cams if c not in ds.cameras]
        if missing:
            raise ValueError(f"dataset {where} lacks camera(s) {missing} (has {ds.cameras})")
    if len(ds.state_names) != enc.input_state_dim:
        raise ValueError(
            f"dataset {where}: the policy's state has {len(ds.state_names)} numbers {ds.state_names}, the "
            f"config expects state_dim {enc.state_dim} + env_state_dim {enc.env_state_dim}"
        )
    train_idx, val_idx = [], []
    for k, (d, part) in enumerate(zip(dirs, parts)):  # every task keeps its share of validation episodes
        if len(part) < 2:
            raise ValueError(f"dataset {d} has {len(part)} episode(s); need at least 2 (train + validation)")
        pos = ds.positions(k) if enc.tasks else list(range(len(part)))
        tr, va = split_episodes(len(part), val_fraction=cfg.train.val_fraction, seed=seed)
        train_idx += [pos[i] for i in tr]
        val_idx += [pos[i] for i in va]
    H = cfg.window  # the chunk, or a family's longer span (policies/base.py)
    O, stride = enc.obs_horizon, enc.obs_stride
    train = windows(ds, train_idx, obs_horizon=O, action_horizon=H, cameras=cams, obs_stride=stride)
    val = windows(ds, val_idx, obs_horizon=O, action_horizon=H, cameras=cams, obs_stride=stride)
    actions_only = windows(ds, train_idx, obs_horizon=1, action_horizon=H, cameras=[])
    vectors = [ds.vectors(i) for i in train_idx]  # the validation episodes stay unseen
    normalizer = Normalizer.fit(
        [(v["state"], v["action"]) for v in vectors], H, list(ds.state_names), cfg.frame,
        shift=cfg.train.shift_augment,
    )  # fmt: skip
    return train, val, actions_only, normalizer, ds


def infinite(loader: DataLoader) -> Iterator[dict]:
    """Cycle a (shuffling) DataLoader forever."""
    while True:
        yield from loader


class BatchNormalizer:
    """Moves a collated batch to the device, changes it to the policy's frame and normalises it
    (the normalizer's one arithmetic, as at inference: carp_policy.processor)."""

    def __init__(self, normalizer: Normalizer, device: torch.device, shift: float = 0.0) -> None:
        self.device, self.normalizer, self.shift = device, normalizer, shift

    def __call__(self, batch: dict, augment: bool = False) -> tuple[dict, torch.Tensor]:
        """Collated batch -> (observation batch for the encoder, (B, H, D) normalised actions).

        augment: apply the translation augmentation (training batches only, never the reports)."""
        nz, raw = self.normalizer, batch["state"].to(self.device).float()  # (B, O, S)
        action = batch["action"].to(self.device).float()  # (B, H, D)
        if augment and self.shift > 0:
            d = (torch.rand(raw.shape[0], 1, 2, device=self.device) * 2 - 1) * self.shift  # (B, 1, 2)
            raw, action = nz.shift_xy(raw, d), action.clone()
            action[..., :2] += d
        state = nz.normalize_state(raw)
        obs = {"state": state, "images": {k: v.to(self.device) for k, v in batch["images"].items()}}
        if "task" in batch:  # a multi-task dataset's task index per window
            obs["task"] = batch["task"].to(self.device)
        # the current pose as a normalised action (processor.EncodedObservations.action_now)
        obs["action_now"] = nz.normalize_action(raw[:, -1:, : action.shape[-1]], raw[:, -1])[:, 0]
        return obs, nz.normalize_action(action, raw[:, -1])


# ----------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds code that still uses the global NumPy RNG)
    torch.manual_seed(seed)


def warmup_cosine(warmup: int, total: int) -> Any:
    """LambdaLR factor: linear warmup, then cosine decay to 10% of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    return f


def action_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Physical-unit errors of (N, H, 10) action chunks: per-dimension mean abs error in mm for xyz and
    gripper, unitless for the six rot6d numbers, plus position (mm) and rotation (deg) summaries."""
    abs_err = np.abs(pred - true).reshape(-1, pred.shape[-1]).mean(0)
    pos = np.linalg.norm(pred[..., POS] - true[..., POS], axis=-1) * 1000.0
    rot = rotation_error_deg(pred[..., ROT6D].reshape(-1, 6), true[..., ROT6D].reshape(-1, 6))
    return {
        "per_dim": {
            "x_mm": abs_err[0] * 1000,
            "y_mm": abs_err[1] * 1000,
            "z_mm": abs_err[2] * 1000,
            **{f"r6d_{i}": abs_err[3 + i] for i in range(6)},
            "gripper_mm": abs_err[GRIPPER] * 1000,
        },
        "position_mm": {"mean": pos.mean(), "p95": np.percentile(pos, 95), "max": pos.max()},
        "rotation_deg": {"mean": rot.mean(), "p95": np.percentile(rot, 95), "max": rot.max()},
        "gripper_mm": {"mean": np.abs(pred[..., GRIPPER] - true[..., GRIPPER]).mean() * 1000},
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic | float):
        return round(float(x), 4)
    return x


class LossLog:
    """Appends rows to ``loss_<stage>.csv`` (kept across --resume)."""

    def __init__(self, path: Path, fields: list[str], resume: bool) -> None:
        self.path, self.fields = path, fields
        if not (resume and path.exists()):
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(fields)

    def write(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([f"{row[k]:.6g}" for k in self.fields])


def plot_losses(run: Path) -> Path | None:
    """Plot every ``loss_*.csv`` of the run into ``loss_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = sorted(run.glob("loss_*.csv"))
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.5), squeeze=False)
    for ax, path in zip(axes[0], logs):
        data = np.genfromtxt(path, delimiter=",", names=True)
        data = np.atleast_1d(data)
        for name in data.dtype.names[1:]:
            if name != "lr":
                ax.plot(data["step"], data[name], label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(path.stem.replace("loss_", "") + " stage")
        ax.legend()
    fig.tight_layout()
    out = run / "loss_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _save_state(path: Path, **items: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(items, tmp)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written resume file


def _load_state(path: Path, device: torch.device, **modules: Any) -> int:
    """Restore what ``_save_state`` wrote into ``modules`` (by key) and the RNG; return the step."""
    st = torch.load(path, map_location=device, weights_only=False)
    for key, module in modules.items():
        module.load_state_dict(st[key])
    torch.set_rng_state(st["rng"])
    return st["step"]


def _loader(ds: Dataset, cfg: PolicyConfig, seed: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        shuffle=shuffle,
        drop_last=False,
        num_workers=cfg.train.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------- stage 1
def train_tokenizer(
    model: nn.Module,
    cfg: PolicyConfig,
    data: Dataset,
    val: Dataset,
    norm: BatchNormalizer,
    normalizer: Normalizer,
    run: Path,
    steps: int,
    resume: bool,
    seed: int,
) -> dict:
    """Train the multi-scale VQ-VAE on action chunks; write tokenizer.safetensors and its report."""
    tok, tc = model.tokenizer, cfg.train
    tok.train()
    opt = torch.optim.AdamW(tok.parameters(), lr=tc.tokenizer_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc.warmup_steps, steps))
    state_path, start = run / "train_state_tokenizer.pt", 0
    if resume and state_path.exists():
        start = _load_state(state_path, norm.device, model=tok, opt=opt, sched=sched)
    log = LossLog(run / "loss_tokenizer.csv", ["step", "loss", "recon_mse", "lr"], resume)
    it = infinite(_loader(data, cfg, seed))
    revived, t0 = 0, time.perf_counter()
    bar = tqdm(range(start, steps), desc="tokenizer", initial=start, total=steps, dynamic_ncols=True)
    for step in bar:
        _, actions = norm(next(it), augment=True)
        recon, loss, _ = tok(actions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(tok.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        # Revive dead codes periodically, but let the codebook settle in the last 10% of training.
        # Reviving after the first step initialises the codebook from the data: with L2 lookup a
        # random N(0, 1) codebook leaves most codes unreachable (synthetic chunks: 13 -> 0.7 deg).
        revive = cfg.tokenizer.revive_every and (step + 1) % cfg.tokenizer.revive_every == 0
        if cfg.tokenizer.revive_every and (step == start == 0 or revive) and step < 0.9 * steps:
            revived += tok.revive_dead_codes()
        if step % tc.log_every == 0 or step == steps - 1:
            mse = torch.mean((recon.detach() - actions) ** 2).item()
            log.write({"step": step, "loss": loss.item(), "recon_mse": mse, "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss.item():.4f}", recon=f"{mse:.2e}")
        if (step + 1) % tc.checkpoint_every == 0 or step == steps - 1:
            save_file(_prefixed(tok.state_dict(), "tokenizer."), str(run / "tokenizer.safetensors"))
            _save_state(
                state_path,
                model=tok.state_dict(),
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                step=step + 1,
                rng=torch.get_rng_state(),
            )
    speed = (steps - start) / max(time.perf_counter() - t0, 1e-9)
    report = tokenizer_report(tok, val, data, norm, normalizer, cfg)
    report.update(steps=steps, steps_per_s=speed, revived_codes=revived, parameters=count_parameters(tok))
    (run / "tokenizer_report.json").write_text(json.dumps(_jsonable(report), indent=1))
    return report


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().contiguous().cpu() for k, v in sd.items()}


@torch.no_grad()
def tokenizer_report(
    tok: nn.Module,
    val: Dataset,
    train: Dataset,
    norm: BatchNormalizer,
    normalizer: Normalizer,
    cfg: PolicyConfig,
) -> dict:
    """Codebook usage over the training windows, reconstruction error on held-out windows (physical)."""
    tok.eval()
    idx_lists = []
    for i, batch in enumerate(_loader(train, cfg, 0, shuffle=False)):
        if i >= 4 * cfg.train.val_batches:
            break
        idx_lists.append(tok.encode(norm(batch)[1]))
    preds, trues = [], []
    for i, batch in enumerate(_loader(val, cfg, 0, shuffle=False)):
        if i >= cfg.train.val_batches:
            break
        actions = norm(batch)[1]
        preds.append(tok.decode(tok.encode(actions)).cpu().numpy())
        trues.append(actions.cpu().numpy())
    pred = normalizer.unnormalize_action(np.concatenate(preds))
    true = normalizer.unnormalize_action(np.concatenate(trues))
    tok.train()
    return {
        "codebook": tok.code_stats(idx_lists),
        "reconstruction": action_errors(pred, true),
        "val_windows": len(pred),
    }


# ----------------------------------------------------------------------------- stage 2
def policy_ema(net: nn.Module, decay: float) -> AveragedModel:
    """The EMA of the policy stage's weights (buffers too): what evaluation and export use.
    ``ema.update_parameters(net)`` after every optimiser step."""
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_policy(
    model: nn.Module,
    cfg: PolicyConfig,
    data: Dataset,
    val: Dataset,
    norm: BatchNormalizer,
    normalizer: Normalizer,
    run: Path,
    steps: int,
    resume: bool,
    seed: int,
) -> dict:
    """Train encoder + transformer on the frozen tokenizer's tokens; EMA weights to policy.safetensors."""
    tc, device = cfg.train, norm.device
    model.prepare_policy_stage(run, device)  # CARP: the frozen tokenizer of stage 1
    net = model.policy_stage_modules().train()  # its keys are those of policy.safetensors
    ema = policy_ema(net, tc.ema_decay)
    decay, no_decay = [], []
    for name, p in net.named_parameters():  # no weight decay on norms, biases and embeddings
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.policy_lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc.warmup_steps, steps))
    state_path, start = run / "train_state_policy.pt", 0
    if resume and state_path.exists():
        start = _load_state(state_path, device, model=net, ema=ema, opt=opt, sched=sched)
    fields = ["step", "loss", *model.policy_log_fields, "lr"]
    log = LossLog(run / "loss_policy.csv", fields, resume)
    it = infinite(_loader(data, cfg, seed + 1))
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc="policy", initial=start, total=steps, dynamic_ncols=True)
    for step in bar:
        obs, actions = norm(next(it), augment=True)
        # bf16 autocast on CUDA (no GradScaler needed); the tiny tokenizer lookups stay in fp32
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, info = model.loss(obs, actions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(net)
        if step % tc.log_every == 0 or step == steps - 1:
            log.write({"step": step, **info, "lr": sched.get_last_lr()[0]})
            bar.set_postfix({k: f"{v:.4f}" for k, v in info.items()})
        if (step + 1) % tc.checkpoint_every == 0 or step == steps - 1:
            save_file(_prefixed(ema.module.state_dict(), ""), str(run / "policy.safetensors"))
            _save_state(
                state_path,
                model=net.state_dict(),
                ema=ema.state_dict(),
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                step=step + 1,
                rng=torch.get_rng_state(),
            )
    speed = (steps - start) / max(time.perf_counter() - t0, 1e-9)
    report = policy_report(model, ema.module, val, norm, normalizer, cfg)
    report.update(steps=steps, steps_per_s=speed, parameters=model.parameter_counts())
    (run / "policy_report.json").write_text(json.dumps(_jsonable(report), indent=1))
    return report


@torch.no_grad()
def policy_report(
    model: nn.Module,
    ema_net: nn.Module,
    val: Dataset,
    norm: BatchNormalizer,
    normalizer: Normalizer,
    cfg: PolicyConfig,
) -> dict:
    """Greedy chunks of the EMA policy on held-out windows vs the demonstrated actions (physical)."""
    eval_model = model.with_policy_weights(ema_net).eval()
    preds, trues = [], []
    for i, batch in enumerate(_loader(val, cfg, 0, shuffle=False)):
        if i >= cfg.train.val_batches:
            break
        obs, actions = norm(batch)
        pred = eval_model.generate(obs).float().cpu().numpy()  # (B, H, D)
        preds.append(pred)
        trues.append(actions[:, : pred.shape[1]].cpu().numpy())  # a longer window: its first H rows
    pred = normalizer.unnormalize_action(np.concatenate(preds))
    true = normalizer.unnormalize_action(np.concatenate(trues))
    return {"validation": action_errors(pred, true), "val_windows": len(pred)}


# ----------------------------------------------------------------------------- CLI
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PolicyConfig:
    """The config of the family the YAML names (a path or a shipped name), with ``section.key=value``
    overrides applied (values parsed as YAML: ``[64, 128]``, ``8``); the registry's loader."""
    return _load_config(path, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carp-train", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        required=True,
        help="YAML file, or a shipped variant (configs/*.yaml): state, state_env, visual, diffusion_state...",
    )
    p.add_argument(
        "--dataset",
        required=True,
        action="append",
        help="dataset directory (LeRobot v3.0 layout) or synthetic[:N]; for a multi-task model one "
        "TASK=DIR per task (repeat: --dataset cup=data/cup --dataset bowl=data/bowl)",
    )
    p.add_argument("--out", required=True, help="run directory (created)")
    p.add_argument("--stage", choices=["tokenizer", "policy", "all"], default="all")
    p.add_argument("--resume", action="store_true", help="continue from the run's train_state_<stage>.pt")
    p.add_argument("--seed", type=int, default=None, help="overrides train.seed")
    add_device_argument(p)
    p.add_argument("--tokenizer-steps", type=int, default=None, help="overrides train.tokenizer_steps")
    p.add_argument("--policy-steps", type=int, default=None, help="overrides train.policy_steps")
    p.add_argument("--batch-size", type=int, default=None, help="overrides train.batch_size")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config field, e.g. --set unet.down_dims=[64,128,256] (repeatable)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``carp-train``."""
    args = build_parser().parse_args(argv)
    return run_main("carp-train", lambda: train(args))


def train(args: argparse.Namespace) -> int:
    """``carp-train`` with parsed arguments."""
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    # a resumed run keeps its own resolved config; a fresh one resolves --config plus overrides
    resumed = args.resume and (run / "config.yaml").exists()
    if resumed and args.set:
        raise UserError("--set cannot change a resumed run's config (it keeps config.yaml)")
    dirs, tasks = parse_datasets(args.dataset)
    overrides = list(args.set)
    if tasks and not resumed:  # a multi-task model: the datasets name its tasks, in order
        overrides += [f"encoder.tasks=[{', '.join(tasks)}]", 'task=""']
    cfg = load_config(run / "config.yaml" if resumed else args.config, overrides)
    if list(cfg.encoder.tasks) != tasks:
        raise UserError(
            f"the run's tasks {list(cfg.encoder.tasks)} do not match the datasets' {tasks or 'single task'}"
        )
    tc = cfg.train
    for arg, field in (
        ("seed", "seed"),
        ("tokenizer_steps", "tokenizer_steps"),
        ("policy_steps", "policy_steps"),
        ("batch_size", "batch_size"),
    ):
        if getattr(args, arg) is not None:
            setattr(tc, field, getattr(args, arg))
    device = torch.device(resolve_device(args.device))
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        # On GPU the CPU only collates batches and launches kernels. torch's default of one OpenMP
        # thread per core makes several runs on one machine oversubscribe it, and every small CPU op
        # then waits on a barrier: measured 0.3 steps/s with 4 runs on 16 cores, 10.5 with 4 threads.
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    seed_everything(tc.seed)
    train_ds, val_ds, act_ds, normalizer, episodes = open_dataset(dirs, cfg, tc.seed)
    cfg.save(run / "config.yaml")
    normalizer.save(run / "normalization.json")
    model = get_family(cfg.family).model_class(cfg).to(device)
    norm = BatchNormalizer(normalizer, device, tc.shift_augment)
    print(
        f"carp-train: {cfg.name} on {', '.join(args.dataset)} ({len(episodes)} episodes, "
        f"{len(train_ds)} train / {len(val_ds)} val windows), device {device}",
        file=sys.stderr,
    )
    summary: dict[str, Any] = {"run": str(run), "config": cfg.name}
    if args.stage in ("tokenizer", "all") and "tokenizer" in model.stages:
        summary["tokenizer"] = train_tokenizer(
            model, cfg, act_ds, val_ds, norm, normalizer, run, tc.tokenizer_steps, args.resume, tc.seed
        )
    if args.stage in ("policy", "all"):
        summary["policy"] = train_policy(
            model, cfg, train_ds, val_ds, norm, normalizer, run, tc.policy_steps, args.resume, tc.seed
        )
    plot_losses(run)
    print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """One screen of results."""
    lines = [f"== carp-train {s['config']} -> {s['run']}"]
    if "tokenizer" in s:
        t = s["tokenizer"]
        cb, rec = t["codebook"], t["reconstruction"]
        lines += [
            f"tokenizer: {t['steps']} steps, {t['steps_per_s']:.1f} steps/s, {t['parameters']:,} params, "
            f"{t['revived_codes']} dead codes revived",
            f"  codebook used per dim: {cb['used_codes']} of {cb['codebook_size']}",
            f"  perplexity per dim:    {[round(x, 1) for x in cb['perplexity']]}",
            "  recon error (held-out): " + ", ".join(f"{k} {v:.3g}" for k, v in rec["per_dim"].items()),
            f"  position {rec['position_mm']['mean']:.2f} mm (p95 {rec['position_mm']['p95']:.2f}), "
            f"rotation {rec['rotation_deg']['mean']:.2f} deg (p95 {rec['rotation_deg']['p95']:.2f}), "
            f"gripper {rec['gripper_mm']['mean']:.2f} mm",
        ]
    if "policy" in s:
        p = s["policy"]
        v, n = p["validation"], p["parameters"]
        lines += [
            f"policy: {p['steps']} steps, {p['steps_per_s']:.1f} steps/s, params "
            + " + ".join(f"{k} {v:,}" for k, v in n.items()),
            f"  validation (EMA): position {v['position_mm']['mean']:.2f} mm "
            f"(p95 {v['position_mm']['p95']:.2f}), rotation {v['rotation_deg']['mean']:.2f} deg "
            f"(p95 {v['rotation_deg']['p95']:.2f}), gripper {v['gripper_mm']['mean']:.2f} mm",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
