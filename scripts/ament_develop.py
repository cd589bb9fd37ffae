"""Give the venv the ament layout colcon would: package index markers, share/<pkg> (package.xml,
launch/, config/) and lib/<pkg>/<executable> for every console script of the five packages.

An editable pip install puts the code on the path but installs no data files, and `ros2 launch` /
`launch_ros.actions.Node(package=P, executable=E)` look for `<prefix>/share/P/...` and
`<prefix>/lib/P/E`. Like `colcon build --symlink-install`, this links the share/ entries to the
source tree (edits take effect at once) and writes two-line wrappers for the executables.
Idempotent. Usage: python scripts/ament_develop.py VENV
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("carp_policy", "carp_sim", "carp_hardware", "carp_teleop", "carp_bringup")


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and os.readlink(dst) == str(src):
            return
        dst.unlink()
    dst.symlink_to(src)


def main(venv: str) -> int:
    prefix = Path(venv).resolve()
    for pkg in PACKAGES:
        src = ROOT / "ros2_ws" / "src" / pkg
        marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / pkg
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        share = prefix / "share" / pkg
        link(src / "package.xml", share / "package.xml")
        for sub in ("launch", "config"):
            # real folders of per-file links: `ros2 launch` finds files with os.walk, which does
            # not follow a linked folder
            dst = share / sub
            if dst.is_symlink():
                dst.unlink()
            if dst.is_dir():
                for old in dst.iterdir():
                    if old.is_symlink() and not old.exists():
                        old.unlink()
            if (src / sub).is_dir():
                for f in sorted((src / sub).iterdir()):
                    if f.is_file():
                        link(f, dst / f.name)
        lib = prefix / "lib" / pkg
        lib.mkdir(parents=True, exist_ok=True)
        for ep in distribution(pkg).entry_points:
            if ep.group != "console_scripts":
                continue
            exe = lib / ep.name
            module, func = ep.value.split(":")
            call = f"import sys; from {module} import {func}; sys.argv[0] = {str(exe)!r}; sys.exit({func}())"
            exe.write_text(f'#!/bin/sh\nexec "{prefix}/bin/python" -c "{call}" "$@"\n')
            exe.chmod(0o755)
    print(f"[ament] share/ and lib/ entries of {len(PACKAGES)} packages in {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / ".venv")))
