"""How many pixels an object's move on the table makes in each camera image, against the crop's range.

    .venv/bin/python benchmarks/camera_pixels.py --task cup [--seed 40000 --layouts 20] \
        [--crop 108 144] [--out benchmarks/results/camera_pixels_cup.json]

A visual policy must read where the object lies from where it appears in the images. Random-crop
augmentation moves the whole image by up to (H - crop_h) / 2 rows and (W - crop_w) / 2 columns, and
the policy learns to ignore such moves; if the object's whole demonstrated range moves it by about
as many pixels along an image axis, that axis carries little the policy can use. For each camera of
the twin this renders the layouts of ``--layouts`` seeds at the start pose, finds the object by its
colour (the cup's red), and fits its image row and column against its x and y on the table:
pixels per mm, the correlation, and the pixels that the layouts' range spans, beside the crop's
shift range. Writes JSON with the machine and the commit. Needs mujoco (the twin), no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import machine
import numpy as np


def object_pixel(image: np.ndarray) -> tuple[float, float]:
    """(row, col) centroid of the red object in an (H, W, 3) uint8 image (NaN if none is seen)."""
    im = image.astype(int)
    red = (im[..., 0] > 120) & (im[..., 1] < 60) & (im[..., 2] < 60)
    rows, cols = np.nonzero(red)
    return (float(rows.mean()), float(cols.mean())) if len(rows) else (np.nan, np.nan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="cup", choices=["cup"], help="a task with a red object")
    p.add_argument("--seed", type=int, default=40000, help="first layout")
    p.add_argument("--layouts", type=int, default=20)
    p.add_argument("--crop", type=int, nargs=2, default=(108, 144), metavar=("H", "W"), help="training crop")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from carp_sim.env import SimCell, SimConfig

    cell = SimCell(task=args.task, config=SimConfig(render=True))
    cameras = tuple(cell.config.cameras)
    objects, pixels = [], {c: [] for c in cameras}
    for s in range(args.seed, args.seed + args.layouts):
        obs = cell.reset(s)
        objects.append(np.asarray(cell.layout.object_xy, dtype=float) * 1e3)  # mm
        for c in cameras:
            pixels[c].append(object_pixel(np.asarray(obs.images[c])))
    height, width = cell.config.image_size
    cell.close()
    objects = np.array(objects)  # (N, 2) mm
    span = objects.max(0) - objects.min(0)  # mm
    crop_shift = {"row": (height - args.crop[0]) / 2, "col": (width - args.crop[1]) / 2}
    result: dict = {
        "machine": machine.machine_info(),
        "task": args.task,
        "seeds": [args.seed, args.seed + args.layouts - 1],
        "image_size": [height, width],
        "crop": list(args.crop),
        "crop_shift_px": crop_shift,  # the largest move of the image a random crop makes, each way
        "object_span_mm": {"x": span[0], "y": span[1]},
        "cameras": {},
    }
    print(f"{args.task}: object range x {span[0]:.0f} mm, y {span[1]:.0f} mm over {args.layouts} layouts; "
          f"crop {args.crop[0]}x{args.crop[1]} of {height}x{width} shifts by up to "
          f"+-{crop_shift['row']:.0f} rows, +-{crop_shift['col']:.0f} cols")  # fmt: skip
    for c in cameras:
        px = np.array(pixels[c])  # (N, 2) row, col
        ok = ~np.isnan(px).any(1)
        fits = {}
        for j, image_axis in enumerate(("row", "col")):
            for i, axis in enumerate("xy"):
                slope = float(np.polyfit(objects[ok, i], px[ok, j], 1)[0])  # px per mm
                corr = float(np.corrcoef(objects[ok, i], px[ok, j])[0, 1])
                fits[f"{image_axis}_per_{axis}"] = {
                    "px_per_mm": slope,
                    "correlation": corr,
                    "range_px": abs(slope) * span[i],
                }
        result["cameras"][c] = {"layouts_seen": int(ok.sum()), **fits}
        for image_axis, axis in (("row", "x"), ("col", "y")):
            f = fits[f"{image_axis}_per_{axis}"]
            print(f"  {c}: object {axis} -> image {image_axis}: {f['px_per_mm']:+.3f} px/mm (corr "
                  f"{f['correlation']:+.2f}), its range spans {f['range_px']:.0f} px against the crop's "
                  f"+-{crop_shift[image_axis]:.0f}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=float))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
