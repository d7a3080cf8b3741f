"""Test-wide settings (never touch the network, keep Gradio quiet) and the `device` fixture."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_NO_CUDA = "no CUDA device on this machine (the cuda cases run where torch.cuda.is_available())"
_CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA)]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA_MARKS)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a test should pass on: the CPU always, and the first GPU when there is one (`-m gpu` selects
    the GPU cases)."""
    return torch.device(request.param)
