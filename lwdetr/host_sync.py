"""Whether the host may read a tensor's values for free, and so whether a data-dependent shortcut pays.

On the CPU, `bool(t)`, `t.item()` or `t.tolist()` are plain memory reads. On a GPU each waits for every kernel
queued so far, so the host stops queueing work while the device drains its queue, and the next kernels start late:
a training step that reads a dozen small values runs measurably slower than one that reads only what it must
(the Hungarian matcher's cost matrices). Code with an optional shortcut (skip the masking of an unpadded batch,
skip a rarely needed `logsigmoid`) takes it only where the test costs nothing.
"""

from __future__ import annotations

import torch

__all__ = ["reads_are_free"]


def reads_are_free(tensor: torch.Tensor) -> bool:
    """True when `tensor` lives in host memory, where reading its values never waits for a device."""
    return tensor.device.type == "cpu"
