"""Atomic writes (`lwdetr.atomic`) and the one model-folder writer: a failure mid-write leaves the previous version
intact and no partial file or folder, whether the writer is `convert`, `save_pretrained` or the app."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import to_original_layout

import lwdetr.checkpoint
from lwdetr.atomic import atomic_folder, atomic_write, atomic_write_bytes, atomic_write_text
from lwdetr.checkpoint import reference_tensors
from lwdetr.config import preset_config
from lwdetr.convert import convert_checkpoint
from lwdetr.modeling import LwDetrForObjectDetection
from lwdetr.processing import LwDetrImageProcessor

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:You'd better set embed_dim")


class _Killed(RuntimeError):
    """Stands for an interruption (disk full, kill) in the middle of a write."""


def _half_then_fail(tensors, filename, metadata=None) -> None:
    """A safetensors write that gets half way: some bytes on disk, then an error."""
    Path(filename).write_bytes(b"\x00" * 1000)
    raise _Killed("interrupted while writing the weights")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".old"))


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An original-layout (Atten4Vis) `.pth` of a random nano detector with 2 classes."""
    torch.manual_seed(0)
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=2)).eval()
    path = tmp_path_factory.mktemp("original") / "LWDETR_nano.pth"
    torch.save({"model": to_original_layout(reference_tensors(model))}, path)
    return path


def _patch_weights_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # wherever the safetensors writer is bound (the shared model-folder writer, or convert itself)
    for module in ("lwdetr.checkpoint", "lwdetr.convert"):
        monkeypatch.setattr(f"{module}.save_file", _half_then_fail, raising=False)


def _patch_processor_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self, save_directory):
        raise _Killed("interrupted while writing preprocessor_config.json")

    monkeypatch.setattr(LwDetrImageProcessor, "save_pretrained", fail)


@pytest.mark.parametrize("patch", [_patch_weights_write, _patch_processor_write], ids=["weights", "processor"])
def test_convert_failing_mid_write_leaves_no_folder(
    nano_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch
) -> None:
    patch(monkeypatch)
    with pytest.raises(_Killed):
        convert_checkpoint(nano_checkpoint, "nano", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert _hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("patch", [_patch_weights_write, _patch_processor_write], ids=["weights", "processor"])
def test_convert_failing_mid_write_keeps_the_previous_folder(
    nano_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch
) -> None:
    output = convert_checkpoint(nano_checkpoint, "nano", tmp_path / "hf")
    weights = output / "model.safetensors"  # an earlier version: other weights than the conversion about to fail
    save_file({key: value + 1 for key, value in load_file(str(weights)).items()}, str(weights))
    before = _snapshot(output)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(before)
    patch(monkeypatch)
    with pytest.raises(_Killed):
        convert_checkpoint(nano_checkpoint, "nano", tmp_path / "hf", num_labels=2)
    assert _snapshot(output) == before
    assert _hidden_leftovers(tmp_path) == []


def test_convert_and_save_pretrained_write_the_same_weights(nano_checkpoint: Path, tmp_path: Path) -> None:
    """One writer: a converted folder and a saved model of the same weights hold the same tensors and config."""
    converted = convert_checkpoint(nano_checkpoint, "nano", tmp_path / "converted")
    model = LwDetrForObjectDetection.from_pretrained(converted)
    model.save_pretrained(tmp_path / "saved")
    ours = load_file(str(converted / "model.safetensors"))
    theirs = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    again = LwDetrForObjectDetection.from_pretrained(tmp_path / "saved")
    assert again.config.to_dict() == model.config.to_dict()


def test_save_pretrained_files_are_readable_by_everyone(tmp_path: Path) -> None:
    """The temporary files an atomic write goes through are private; the files they become must not be."""
    old_umask = os.umask(0o022)
    try:
        LwDetrForObjectDetection(preset_config("nano", num_labels=2)).save_pretrained(tmp_path / "model")
    finally:
        os.umask(old_umask)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "model" / name).stat().st_mode) == 0o644, name
    assert _hidden_leftovers(tmp_path) == []


def test_save_pretrained_failing_keeps_the_previous_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=2))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    before = _snapshot(folder)
    monkeypatch.setattr(lwdetr.checkpoint, "save_file", _half_then_fail)
    with pytest.raises(_Killed):
        model.save_pretrained(folder)
    assert _snapshot(folder) == before and _hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------- lwdetr.atomic


def test_atomic_write_text_and_bytes_replace_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "notes.txt"
    assert atomic_write_text(target, "first ü") == target
    assert target.read_text(encoding="utf-8") == "first ü"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["notes.txt"]


def test_atomic_write_failing_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")

    def half(tmp: str) -> None:
        Path(tmp).write_text("ne")
        raise _Killed("half written")

    with pytest.raises(_Killed):
        atomic_write(target, half)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_atomic_folder_failing_inside_or_at_the_swap_keeps_the_old_folder(tmp_path: Path) -> None:
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "a.txt").write_text("old")
    with pytest.raises(_Killed), atomic_folder(folder) as staging:
        (staging / "a.txt").write_text("new")
        raise _Killed("inside")
    assert _snapshot(folder) == {"a.txt": b"old"}

    def swap_fails() -> None:
        raise _Killed("between the renames")

    with pytest.raises(_Killed), atomic_folder(folder, before_swap=swap_fails) as staging:
        (staging / "a.txt").write_text("new")
    assert _snapshot(folder) == {"a.txt": b"old"}  # put back at once, not left as best.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

    with atomic_folder(folder, keep="best.prev") as staging:
        (staging / "b.txt").write_text("new")
    assert _snapshot(folder) == {"b.txt": b"new"} and _snapshot(tmp_path / "best.prev") == {"a.txt": b"old"}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_only_ui_and_handlers_import_gradio() -> None:
    """What lwdetr_app/__init__'s docstring says: the other app modules are plain Python."""
    plain = sorted(p.stem for p in (REPO / "lwdetr_app").glob("*.py") if p.stem not in ("__init__", "ui", "handlers"))
    code = f"import sys\nfor m in {plain!r}: __import__('lwdetr_app.' + m)\nprint('gradio' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
