"""The one conversion from a camera image to a policy's input image.

Every path that hands an image to a policy or stores one for training calls ``fit_image``: the
recorder before it writes a frame, the dataset reader when stored frames differ from a model's
input size, the policy path on live camera frames. One function, so what a policy was trained on
and what it sees on the robot are made the same way (no train/deploy skew).

The rule: centre-crop to the target's aspect ratio (never stretch), then resize with area
averaging (the right filter for downscaling: no aliasing of fine texture). A 640x480 RealSense
frame becomes 160x120 by a pure 4x area resize; a 1280x720 UVC frame loses 160 columns each side.
"""

from __future__ import annotations

import numpy as np

POLICY_IMAGE_SIZE = (120, 160)  # (H, W) the shipped policies take


def crop_box(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred crop of an ``src_hw`` image with ``dst_hw``'s aspect."""
    H, W = int(src_hw[0]), int(src_hw[1])
    h, w = int(dst_hw[0]), int(dst_hw[1])
    if min(H, W, h, w) < 1:
        raise ValueError(f"image sizes must be positive, got source {src_hw}, target {dst_hw}")
    if H * w > W * h:  # source is taller than the target aspect: crop rows
        ch, cw = round(W * h / w), W
    else:  # wider (or equal): crop columns
        ch, cw = H, round(H * w / h)
    return (H - ch) // 2, (W - cw) // 2, ch, cw


def fit_image(image: np.ndarray, size: tuple[int, int] = POLICY_IMAGE_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 RGB camera image -> (size[0], size[1], 3) uint8 RGB policy image.

    Identity (no copy) when the image already has the size."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"fit_image needs an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    top, left, ch, cw = crop_box(img.shape[:2], (h, w))
    crop = img[top : top + ch, left : left + cw]
    import cv2  # only where a resize happens: a policy at its native size needs no OpenCV

    # INTER_AREA averages source pixels when shrinking; upscaling (rare) falls back to bilinear
    interp = cv2.INTER_AREA if ch >= h and cw >= w else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=interp))


def scale_intrinsics(K: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """The camera matrix (3, 3) of the image ``fit_image`` makes from an ``src_hw`` image with ``K``."""
    top, left, ch, cw = crop_box(src_hw, dst_hw)
    sy, sx = dst_hw[0] / ch, dst_hw[1] / cw
    K2 = np.array(K, dtype=np.float64).copy()
    K2[0, 2] -= left
    K2[1, 2] -= top
    # pixel centres: x' + 0.5 = sx (x + 0.5)
    K2[0] *= sx
    K2[1] *= sy
    K2[0, 2] += 0.5 * sx - 0.5
    K2[1, 2] += 0.5 * sy - 0.5
    return K2
