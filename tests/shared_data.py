"""Where the tests find the project's shared data: ../shared beside the repository (a copy of it in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
MICROCONTROLLERS = SHARED / "datasets" / "microcontrollers"  # a Roboflow COCO export, 5 classes


def microcontrollers_dataset() -> Path:
    """The shared microcontrollers dataset; a clear skip when it is absent (a failure in CI, which always has it)."""
    if MICROCONTROLLERS.is_dir():
        return MICROCONTROLLERS
    message = f"the shared dataset is absent: expected ../shared/datasets/microcontrollers, i.e. {MICROCONTROLLERS}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
