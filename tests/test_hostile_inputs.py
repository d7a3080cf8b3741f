"""Hostile model folders and image folders: one line naming the file, never a traceback, a hang or a blow-up.

Model folders: `LwDetrForObjectDetection.from_pretrained`, `Detector.from_pretrained` and `python -m lwdetr predict
--model` on damaged files. Image folders: `python -m lwdetr predict DIR` on a mix of good images and hostile files
(a 12 GiB sparse .jpg, a FIFO, EPS content, a name with control characters...) under the issue's 8 GiB memory cap.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lwdetr import checkpoint
from lwdetr.__main__ import main
from lwdetr.config import preset_config
from lwdetr.detector import Detector
from lwdetr.modeling import LwDetrForObjectDetection
from lwdetr.processing import LwDetrImageProcessor

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:You'd better set embed_dim")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    LwDetrForObjectDetection(preset_config("nano", num_labels=3)).save_pretrained(folder)
    LwDetrImageProcessor(size={"height": 128, "width": 128}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- damaged model folders


def _edit_config(**fields) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return edit


def _safetensors_header(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def _huge_tensor(header: dict) -> None:
    name = next(key for key in header if key != "__metadata__")
    header[name]["shape"], header[name]["data_offsets"] = [10**6, 10**6], [0, 4 * 10**12]


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100_000])


DAMAGE = {
    "truncated weights": ("model.safetensors", "not a valid safetensors file", _truncate),
    "header length of 2**62": (
        "model.safetensors",
        "not a valid safetensors file",
        lambda folder: (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}"),
    ),
    "tensor claiming 4 TB": (
        "model.safetensors",
        "not a valid safetensors file",
        lambda folder: _safetensors_header(folder, _huge_tensor),
    ),
    "missing weights": ("model.safetensors", "missing", lambda folder: (folder / "model.safetensors").unlink()),
    "missing config": ("config.json", "missing", lambda folder: (folder / "config.json").unlink()),
    "config is a list": (
        "config.json",
        "expected a JSON object, got list",
        lambda folder: (folder / "config.json").write_text("[1, 2]"),
    ),
    "config is not JSON": (
        "config.json",
        "invalid JSON",
        lambda folder: (folder / "config.json").write_text("{oops"),
    ),
    "config nested 20000 deep": (
        "config.json",
        "invalid JSON (nested too deeply)",
        lambda folder: (folder / "config.json").write_text("[" * 20000 + "]" * 20000),
    ),
    "config without fields": (
        "model.safetensors",
        "does not fit the architecture of its config.json",
        lambda folder: (folder / "config.json").write_text("{}"),
    ),
    "field of the wrong type": ("config.json", "not a usable LW-DETR config", _edit_config(d_model="abc")),
    "model far larger than its weights": ("config.json", "refusing to build it", _edit_config(d_model=100_000)),
    "ten million layers": (
        "config.json",
        "decoder_layers = 10000000 is outside 0..256",
        _edit_config(decoder_layers=10**7),
    ),
    "another model type": ("config.json", "not 'lw_detr'", _edit_config(model_type="bert")),
}


@pytest.fixture(params=list(DAMAGE), ids=list(DAMAGE))
def damaged(request: pytest.FixtureRequest, model_dir: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """(damaged folder, the file the message must name, words it must contain)."""
    name, words, damage = DAMAGE[request.param]
    folder = tmp_path / "damaged"
    shutil.copytree(model_dir, folder)
    damage(folder)
    return folder, folder / name, words


def test_damaged_model_folders_raise_one_line_naming_the_file(damaged: tuple[Path, Path, str]) -> None:
    folder, path, words = damaged
    for load in (LwDetrForObjectDetection.from_pretrained, Detector.from_pretrained):
        with pytest.raises(checkpoint.ModelLoadError) as caught:
            load(folder)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and words in message, message
        assert "\n" not in message
        assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[]", "not a usable image processor configuration (TypeError"),
        ("{x", "not a usable image processor configuration (JSONDecodeError"),
        ('{"size": {"height": 100000, "width": 100000}}', "must give edges of 1 to 4096 pixels"),
    ],
)
def test_damaged_processor_config(model_dir: Path, tmp_path: Path, content: str, words: str) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(model_dir, folder)
    (folder / "preprocessor_config.json").write_text(content)
    with pytest.raises(checkpoint.ModelLoadError) as caught:
        Detector.from_pretrained(folder)
    assert str(caught.value).startswith(f"{folder / 'preprocessor_config.json'}: ") and words in str(caught.value)


def test_cli_reports_a_damaged_model_in_one_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    for case in ("truncated weights", "header length of 2**62", "config is a list", "missing weights"):
        name, words, damage = DAMAGE[case]
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(model_dir, folder)
        damage(folder)
        assert main(["predict", str(image), "--model", str(folder), "--output", str(tmp_path / "r.json")]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"lwdetr: error: {folder / name}: ") and words in lines[0]
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- a hostile image folder


def _hostile_folder(root: Path) -> tuple[list[Path], dict[str, str]]:
    """Good images and hostile files below `root`; returns (good images, {bad file name: expected words})."""
    rng = np.random.default_rng(0)
    good = [root / "a.png", root / "sub" / "b.jpg"]
    for path in good:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    with open(root / "sparse.jpg", "wb") as file:  # 12 GiB of holes: no disk space, but read whole it is 12 GiB
        file.write(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
        file.truncate(12 * 2**30)
    os.mkfifo(root / "pipe.jpg")
    (root / "vector.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath stroke\n%%EOF\n")
    portable = root / "portable.png"
    Image.new("RGB", (8, 8)).save(portable, "PPM")
    (root / "sub" / "two\nlines.png").write_text("not an image")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    expected = {
        "sparse.jpg": "more than the limit of 268,435,456",
        "pipe.jpg": "not a regular file",
        "vector.jpg": "not a recognised image file",
        "portable.png": "not a recognised image file",
        "two\\nlines.png": "not a recognised image file",
        "dangling.jpg": "no such file",
    }
    return good, expected


_CAPPED_CLI = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.RLIM_INFINITY))  # the issue's memory cap
sys.argv = ["lwdetr", *sys.argv[1:]]
runpy.run_module("lwdetr", run_name="__main__")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS caps the memory on Linux")
def test_cli_on_a_hostile_folder_writes_the_good_results(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    good, expected = _hostile_folder(root)
    output = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-c", _CAPPED_CLI, "predict", str(root), "--model", str(model_dir)]
    result = subprocess.run(
        [*command, "--threshold", "0.0", "--output", str(output), "--batch-size", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("lwdetr: skipped ")]
    assert len(skipped) == len(expected), result.stderr
    for name, words in expected.items():
        assert sum(name in line and words in line for line in skipped) == 1, (name, result.stderr)
    assert all(line.startswith("lwdetr: ") for line in result.stderr.splitlines()), result.stderr
    records = json.loads(output.read_text())
    assert {record["file_name"] for record in records} == {str(path) for path in good}


def test_cli_byte_limit_setting(model_dir: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    monkeypatch.setenv("LWDETR_MAX_IMAGE_BYTES", "a lot")
    assert main(["predict", str(image), "--model", str(model_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lwdetr: error: LWDETR_MAX_IMAGE_BYTES='a lot' is not a positive whole number of bytes"
    ]
