"""`pip install .`: the wheel builds, holds the three packages and the kernel sources, declares what
requirements.txt pins, and once installed its Python API and both CLIs work from a folder outside the repository;
`import lwdetr` imports only what it needs.

The wheel goes into a fresh virtual environment that sees the machine's packages (`--system-site-packages`, so
torch and the rest are not downloaded) and is installed with `--no-deps`; every command runs with the venv's
interpreter, from a temporary folder, without PYTHONPATH, so nothing can come from the checkout.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "demo_model"
DEMO_IMAGE = REPO / "examples" / "images" / "shapes_1.jpg"
# Training and app dependencies: inference never needs them.
NOT_FOR_INFERENCE = ("gradio", "accelerate", "albumentations", "pandas", "matplotlib", "pycocotools", "datasets")
KERNEL_SOURCES = sorted(p.name for p in (REPO / "lwdetr" / "cpu" / "kernels").iterdir() if p.suffix in {".c", ".h"})
# Run-time and checkout-only folders: copying them would only slow the build down.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "app_data", "runs", "test-artifacts"
)


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONDONTWRITEBYTECODE": "1"}


def _run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args[:4]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def _setuptools_supports_pyproject() -> bool:
    try:
        return Version(importlib.metadata.version("setuptools")) >= Version("77")
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds from a copy of the checkout (so the build leaves no build/ folder in it)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    # Offline with the machine's setuptools when it is new enough; otherwise pip fetches the build backend.
    isolation = ["--no-build-isolation"] if _setuptools_supports_pyproject() else []
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", *isolation, "-q", "-w", root / "dist"], cwd=source)
    (built,) = (root / "dist").glob("lwdetr-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (seeing the machine's packages) with the wheel installed; returns its scripts folder."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root / "venv"], cwd=root)
    scripts = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    # The machine's pip (visible through the system site-packages) installs into the venv it runs in.
    _run([scripts / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    return scripts


def _metadata(wheel: Path) -> tuple[list[str], list[Requirement]]:
    """(the wheel's file names, its Requires-Dist)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (meta_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(archive.read(meta_name).decode())
    return names, [Requirement(line) for line in meta.get_all("Requires-Dist")]


def test_wheel_holds_the_packages_and_the_kernel_sources(wheel: Path) -> None:
    names, _ = _metadata(wheel)
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"lwdetr", "finetune", "lwdetr_app"}
    assert sorted(n.split("/")[-1] for n in names if n.startswith("lwdetr/cpu/kernels/")) == KERNEL_SOURCES
    assert KERNEL_SOURCES, "no kernel sources in the checkout"


def _requirement_lines(name: str) -> list[Requirement]:
    lines = (REPO / name).read_text().splitlines()
    return [Requirement(line) for line in (s.split("#")[0].strip() for s in lines) if line and not line.startswith("-")]


def _extras_of(requirement: Requirement) -> set[str]:
    """The extras a Requires-Dist line belongs to ({""} for the base install)."""
    if requirement.marker is None:
        return {""}
    return {extra for extra in ("onnx", "train", "app", "dev") if requirement.marker.evaluate({"extra": extra})}


def test_wheel_declares_what_the_requirement_files_pin(wheel: Path) -> None:
    _, declared = _metadata(wheel)
    by_name = {(r.name.lower().replace("_", "-"), extra): r for r in declared for extra in _extras_of(r)}

    def declared_as(requirement: Requirement, extras: tuple[str, ...]) -> Requirement | None:
        name = requirement.name.lower().replace("_", "-")
        return next((by_name[name, e] for e in extras if (name, e) in by_name), None)

    # requirements.txt (the Space) = the base install plus [train] and [app]; requirements-dev.txt adds [dev].
    for requirement in _requirement_lines("requirements.txt"):
        found = declared_as(requirement, ("", "train", "app"))
        assert found is not None and found.specifier == requirement.specifier, f"{requirement} vs {found}"
    for requirement in _requirement_lines("requirements-dev.txt"):
        found = declared_as(requirement, ("dev", "onnx"))
        assert found is not None and found.specifier == requirement.specifier, f"{requirement} vs {found}"
    base = {r.name.lower() for r in declared if r.marker is None}
    assert "torch" in base and not base & {"gradio", "accelerate", "albumentations", "pycocotools", "onnx"}
    assert str(by_name["torch", ""].specifier) == "==2.13.0"  # unpinned, pip would fetch a multi-GB CUDA build


def test_installed_package_detects_from_another_folder(venv: Path, tmp_path: Path) -> None:
    script = (
        "import pathlib, sys, lwdetr\n"
        "package = pathlib.Path(lwdetr.__file__).parent\n"
        "print(package.relative_to(sys.prefix))\n"
        "print(sorted(p.name for p in (package / 'cpu' / 'kernels').iterdir()))\n"
        f"detector = lwdetr.Detector.from_pretrained({str(DEMO_MODEL)!r})\n"
        f"print(len(detector.predict({str(DEMO_IMAGE)!r})))\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({NOT_FOR_INFERENCE!r})))\n"
    )
    lines = _run([venv / "python", "-c", script], cwd=tmp_path).stdout.splitlines()
    assert "site-packages" in lines[0]  # the installed copy, not the checkout
    assert lines[1] == str(KERNEL_SOURCES)
    assert int(lines[2]) > 0
    assert lines[3] == "[]"  # loading and running a model pulls in no training or app dependency


def test_console_scripts_run(venv: Path, tmp_path: Path) -> None:
    assert "predict" in _run([venv / "lwdetr", "--help"], cwd=tmp_path).stdout
    assert "--data" in _run([venv / "lwdetr-finetune", "--help"], cwd=tmp_path).stdout


def test_export_without_onnx_says_what_to_install(tmp_path: Path) -> None:
    """torch's exporter needs the onnx package, which the base install leaves out: one line, no traceback, and
    before the model is loaded."""
    script = (
        "import sys\n"
        "sys.modules['onnx'] = None  # as if it were not installed\n"
        "from lwdetr.__main__ import main\n"
        f"sys.exit(main(['export', '--model', {str(DEMO_MODEL)!r}, '--output', 'model.onnx']))\n"
    )
    env = {**_clean_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "lwdetr: error: ONNX export needs the onnx package: pip install onnx (or pip install 'lwdetr[onnx]')"
    ]
    assert not (tmp_path / "model.onnx").exists()


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """The top-level modules a fresh interpreter holds after running `code` (the checkout on the path)."""
    script = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
    env = {**_clean_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_import_lwdetr_imports_no_framework(tmp_path: Path) -> None:
    """`import lwdetr` costs a fraction of a second: the public names load on first use, transformers (seconds to
    import) only with the config classes or a model."""
    loaded = _modules_after("import lwdetr", tmp_path)
    assert "lwdetr" in loaded
    assert not loaded & {"transformers", "torch", *NOT_FOR_INFERENCE}


def test_every_public_name_loads_on_first_use(tmp_path: Path) -> None:
    code = (
        "import lwdetr, transformers\n"
        "missing = [name for name in lwdetr.__all__ if getattr(lwdetr, name, None) is None]\n"
        "assert not missing, missing\n"
        "assert lwdetr.LwDetrConfig is transformers.LwDetrConfig  # config.json round-trips through transformers\n"
        "assert lwdetr.config.LwDetrViTConfig is transformers.LwDetrViTConfig\n"
        "assert type(lwdetr.preset_config('nano')) is transformers.LwDetrConfig\n"
        "assert sorted(lwdetr.__all__) == sorted(lwdetr._EXPORTS)\n"
    )
    loaded = _modules_after(code, tmp_path)
    assert not loaded & set(NOT_FOR_INFERENCE)
