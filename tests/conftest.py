"""Test-wide settings (never touch the network, keep Gradio quiet), the `device` fixture and the app fixtures
(`assets`, `ctx`) shared by the app test files."""

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


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory):
    """(demo model folder, example images, labels): the bundled ones, or small stand-ins when they are missing."""
    from test_app import bundled_or_test_assets  # imports gradio: only for the tests that ask

    return bundled_or_test_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def ctx(tmp_path, assets, monkeypatch):
    """An AppContext over a fresh data folder, the demo model as default, and its own training job."""
    from lwdetr_app.handlers import AppContext
    from lwdetr_app.models import ModelChoice, ModelRegistry
    from lwdetr_app.settings import AppSettings
    from lwdetr_app.training import TrainingJob

    model, examples, _ = assets
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "data" / "gradio"))
    settings = AppSettings(data_dir=tmp_path / "data", demo_model_dir=model, examples_dir=examples[0].parent)
    default = ModelChoice(str(model), "Bundled demo model (test): the hub is unreachable")
    return AppContext(settings, default, ModelRegistry(device="cpu"), TrainingJob())
