"""Conventions every ``carp-*`` command shares, so that they behave alike.

- ``--device``: ``auto`` (the default: CUDA when this machine has it for the backend in use, else
  the CPU), ``cpu``, ``cuda`` or ``cuda:N``. ``resolve_device`` turns it into a concrete device.
- A user's mistake (a missing file, a bad option, a model that does not fit the task) is one line
  on stderr, ``<prog>: error: <what is wrong>``, and exit code 2, as argparse does for a bad
  argument. No traceback: set ``CARP_DEBUG=1`` to see one.
- Settings are overridden one way: ``--set section.key=value`` (YAML values), where a command has
  a config.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; ``run_main`` prints it as one line and exits with code 2."""


# Exceptions that mean "the input is wrong", not "the program is broken". Every loader and config
# in the stack raises one of these with a message that names what is wrong.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, FileExistsError)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The one ``--device`` option of every command."""
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default: CUDA if available, else CPU) | cpu | cuda | cuda:N",
    )


def resolve_device(device: str, backend: str = "torch") -> str:
    """``auto`` -> ``cuda`` where the backend can use it here, else ``cpu``; others checked and kept.

    backend: ``torch`` (training, torch policies) or ``onnxruntime`` (the engine; CUDA means the
    CUDA execution provider of onnxruntime-gpu)."""
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device != "auto":
        return device
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_main(prog: str, fn: Callable[[], int | None]) -> int:
    """Run a command's body; a user's mistake becomes one line on stderr and exit code 2."""
    try:
        return int(fn() or 0)
    except USER_ERRORS as e:
        if os.environ.get("CARP_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
