"""Synthetic pick-and-place demonstrations with the reader interface of ``carp_policy.dataset``.

For tests and the ``carp-train --dataset synthetic`` smoke run: smooth TCP paths (minimum-jerk
segments through approach / grasp / lift / carry / place waypoints), the gripper closing at the grasp
and opening at the place, the tool pointing down with a slowly turning yaw, and cheap rendered
camera images in which the TCP and the object are visible, so a visual policy has something to see.

``SyntheticEpisodes`` mirrors ``EpisodeDataset`` (``stats()``, ``cameras``, ``state_names``,
``action_names``, ``len``, ``episode(i)``) and ``SyntheticWindows`` mirrors ``WindowDataset``
(items ``{"state": (O, 10), "images": {cam: (O, H, W, 3) uint8}, "action": (16, 10), ...}``).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation
from torch.utils.data import Dataset

from carp_policy.actions import ACTION_NAMES, STATE_NAMES, matrix_to_rot6d

OPEN, CLOSED = 0.085, 0.0  # Robotiq 2F-85 opening, m


def _min_jerk(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """n samples of a minimum-jerk segment from a to b (excluding a), shape (n, len(a))."""
    s = np.linspace(0.0, 1.0, n + 1)[1:, None]
    return a + (b - a) * (10 * s**3 - 15 * s**4 + 6 * s**5)


def make_episode(
    rng: np.random.Generator,
    image_size: tuple[int, int] = (120, 160),
    cameras: tuple[str, ...] = ("wrist", "scene"),
) -> dict[str, np.ndarray]:
    """One random pick-and-place episode: {"state": (T, 10), "action": (T, 10), "images": {cam: ...}}."""
    pick = np.array([rng.uniform(0.35, 0.6), rng.uniform(-0.25, 0.25), 0.05])
    place = np.array([rng.uniform(0.35, 0.6), rng.uniform(-0.25, 0.25), 0.08])
    start = np.array([0.45, 0.0, 0.35]) + rng.normal(0, 0.02, 3)
    yaw0, yaw1 = rng.uniform(-0.5, 0.5, 2)
    up = np.array([0.0, 0.0, 0.12])
    # waypoints: (x, y, z, yaw, gripper) and segment lengths in steps (10 Hz)
    wps = [
        np.r_[start, yaw0, OPEN],
        np.r_[pick + up, yaw0, OPEN],
        np.r_[pick, yaw0, OPEN],
        np.r_[pick, yaw0, CLOSED],
        np.r_[pick + up, yaw0, CLOSED],
        np.r_[place + up, yaw1, CLOSED],
        np.r_[place, yaw1, CLOSED],
        np.r_[place, yaw1, OPEN],
        np.r_[place + up, yaw1, OPEN],
    ]
    lens = [12, 8, 4, 6, 14, 6, 4, 6]
    path = [wps[0][None]]
    for a, b, n in zip(wps[:-1], wps[1:], lens):
        path.append(_min_jerk(a, b, n + int(rng.integers(0, 3))))
    path = np.concatenate(path)  # (T+1, 5)
    rot = Rotation.from_euler("xz", np.stack([np.full(len(path), np.pi), path[:, 3]], 1)).as_matrix()
    poses = np.concatenate([path[:, :3], matrix_to_rot6d(rot), path[:, 4:5]], axis=1)  # (T+1, 10)
    state, action = poses[:-1], poses[1:]  # the action is the next commanded pose
    images = {cam: render(cam, state, pick, image_size) for cam in cameras}
    # (T, 8) laid out as the twin's: object position, object up axis, place target xy
    env_state = np.tile(np.r_[pick, 0.0, 0.0, 1.0, place[:2]], (len(state), 1))
    return {
        "state": state.astype(np.float32),
        "action": action.astype(np.float32),
        "images": images,
        "env_state": env_state.astype(np.float32),
    }


def render(camera: str, state: np.ndarray, obj: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 toy frames: the scene camera sees the TCP (red) and object (green) from
    above; the wrist camera sees the object offset by the TCP position, its size growing as z drops."""
    H, W = size
    T = len(state)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.full((T, H, W, 3), 60, np.uint8)
    to_px = lambda p: ((p[..., 0] - 0.3) / 0.35 * H, (p[..., 1] + 0.3) / 0.6 * W)  # noqa: E731
    for t in range(T):
        if camera == "scene":
            oy, ox = to_px(obj)
            ty, tx = to_px(state[t, :3])
            img[t][(yy - oy) ** 2 + (xx - ox) ** 2 < 36] = (40, 200, 40)
            img[t][(yy - ty) ** 2 + (xx - tx) ** 2 < 16 + 40 * state[t, 2]] = (220, 40, 40)
        else:
            rel = obj[:2] - state[t, :2]
            cy, cx = H / 2 + rel[0] * 300, W / 2 + rel[1] * 300
            r = 8 + 30 * (0.4 - state[t, 2])
            img[t][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (40, 200, 40)
            img[t][:, :4] = int(255 * state[t, 9] / OPEN)  # the gripper fingers' opening, as a bar
    return img


class SyntheticEpisodes:
    """In-memory episodes with the ``EpisodeDataset`` interface."""

    def __init__(
        self,
        num_episodes: int = 20,
        seed: int = 0,
        image_size: tuple[int, int] = (120, 160),
        cameras: tuple[str, ...] = ("wrist", "scene"),
        env_state_dim: int = 0,
    ) -> None:
        """env_state_dim: 0, or up to 8 numbers of [object xyz, object up axis, target xy] appended
        to the state (as ``EpisodeDataset`` does with an environment-state key)."""
        if not 0 <= env_state_dim <= 8:
            raise ValueError(f"synthetic episodes have 0..8 environment-state numbers, not {env_state_dim}")
        rng = np.random.default_rng(seed)
        self.cameras = list(cameras)
        env_names = ["object_x", "object_y", "object_z", "object_up_x", "object_up_y", "object_up_z",
                     "target_x", "target_y"][:env_state_dim]  # fmt: skip
        self.state_names, self.action_names = [*STATE_NAMES, *env_names], list(ACTION_NAMES)
        self.episodes = [make_episode(rng, image_size, cameras) for _ in range(num_episodes)]
        for ep in self.episodes:
            ep["state"] = np.concatenate([ep["state"], ep.pop("env_state")[:, :env_state_dim]], axis=1)

    def __len__(self) -> int:
        return len(self.episodes)

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """Episode i: {"state": (T, 10), "action": (T, 10), "images": {cam: (T, H, W, 3)}}."""
        return self.episodes[i]

    def vectors(self, i: int) -> dict[str, np.ndarray]:
        """Episode i's vectors, as ``EpisodeDataset.vectors``: {"state", "action", ...}."""
        return self.episodes[i]

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-dimension min / max / mean / std of state and action over all episodes."""
        out = {}
        for key, name in (("observation.state", "state"), ("action", "action")):
            x = np.concatenate([e[name] for e in self.episodes])
            out[key] = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
        return out


class SyntheticWindows(Dataset):
    """Training windows with the ``WindowDataset`` interface (edge padding at episode ends)."""

    def __init__(
        self,
        ds: SyntheticEpisodes,
        episodes: list[int] | np.ndarray,
        obs_horizon: int,
        action_horizon: int = 16,
        cameras: list[str] | tuple[str, ...] = (),
        obs_stride: int = 1,
    ) -> None:
        self.ds, self.O, self.H, self.cameras = ds, obs_horizon, action_horizon, list(cameras)
        self.stride = obs_stride
        self.index = [(int(e), f) for e in episodes for f in range(len(ds.episode(int(e))["state"]))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, f = self.index[i]
        ep = self.ds.episode(e)
        T = len(ep["state"])
        obs_t = np.clip(f - self.stride * np.arange(self.O - 1, -1, -1), 0, T - 1)
        act_t = np.clip(np.arange(f, f + self.H), 0, T - 1)
        return {
            "state": ep["state"][obs_t],
            "action": ep["action"][act_t],
            "images": {c: ep["images"][c][obs_t] for c in self.cameras},
            "episode": e,
            "frame": f,
        }


def split_episodes(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random episode split (at least one validation episode when n > 1)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction)) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
