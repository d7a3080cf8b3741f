"""Every device the code may meet: the CPU always, a CUDA GPU when there is one (the `device` fixture in conftest;
`benchmarks/gpu_check.py` runs the GPU cases and the benchmark in one command).

Model parity with the reference, the Detector in float32 / bfloat16 / float16, a training step in each mixed
precision, a resume on another device than the one that saved the run, and how few device values a training step
reads (on the CPU, with the GPU code paths taken: see `lwdetr.host_sync`).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from model_utils import (
    missing_detections,
    outputs_with_the_same_proposals,
    ragged_batch,
    relative_error,
    twin_models,
)

from finetune import loss_log
from finetune import train as train_module
from finetune.config import TrainConfig, resume_config
from finetune.loss_log import LOGGED_LOSSES
from finetune.state import Progress
from finetune.synthetic import make_synthetic_dataset
from finetune.train import train
from lwdetr import host_sync
from lwdetr.detector import Detector
from lwdetr.loss import _log_probs, _prepare_targets

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPOSITORY / "examples" / "demo_model"
DEMO_IMAGES = sorted((REPOSITORY / "examples" / "images").glob("*.jpg"))


def _exact_float32(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """No TF32 on a GPU (cuDNN convolutions use it by default), so that both models round like the CPU's float32."""
    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _train_on(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train` takes the GPU whenever there is one; for the cpu case on a GPU machine, hide it."""
    if device.type == "cpu" and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------------------------------ the model


def test_model_matches_the_reference_on(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    _exact_float32(device, monkeypatch)
    reference, ours = twin_models("nano")
    reference.to(device).eval()
    ours.to(device).eval()
    step = ours.model.backbone.backbone.size_divisor

    def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, mask = ragged_batch(6 * step, 6 * step, step, 2, seed)
        return pixels.to(device), mask.to(device)

    expected, got = outputs_with_the_same_proposals(reference, ours, inputs)
    for key in ("logits", "pred_boxes", "enc_outputs_coord_logits", "last_hidden_state"):
        assert got[key].device.type == device.type
        assert relative_error(got[key], expected[key]) < 1e-4, key


@pytest.fixture(scope="module")
def float32_cpu_detections() -> list:
    return Detector.from_pretrained(DEMO_MODEL, device="cpu").predict(DEMO_IMAGES, threshold=0.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_detector_finds_the_float32_cpu_detections_on(
    device: torch.device, dtype: str, float32_cpu_detections: list
) -> None:
    """On the bundled trained model: every float32 CPU detection above 0.5, with the same label, IoU >= 0.9 and its
    score within 0.05 (the bfloat16 criterion of test_perf_paths), in each precision on each device."""
    detector = Detector.from_pretrained(DEMO_MODEL, device=device, dtype=dtype)
    assert next(detector.model.parameters()).device.type == device.type
    found = detector.predict(DEMO_IMAGES, threshold=0.3)
    assert sum(map(len, float32_cpu_detections)) >= 5
    assert not missing_detections(found, float32_cpu_detections, score_tolerance=0.05), dtype


# --------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train / 2 val synthetic images of 128 px: two batches of two."""
    root = tmp_path_factory.mktemp("shapes") / "data"
    make_synthetic_dataset(root, num_train=4, num_val=2, image_size=128, seed=5)
    return root


def _config(data: Path, output: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data),
        output=str(output),
        model="nano",
        epochs=1,
        batch_size=2,
        image_size=128,
        num_workers=0,
        multi_scale=False,
        augment=False,
        ema=False,
        max_steps=1,
        warmup_steps=1,
    )
    return TrainConfig(**{**fields, **overrides})


def _record_head_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtypes of the class head's outputs in training mode, for every model `train` builds."""
    dtypes: list[torch.dtype] = []
    build = train_module.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        model.class_embed.register_forward_hook(
            lambda module, _, out: dtypes.append(out.dtype) if module.training else None
        )
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_watch)
    return dtypes


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_mixed_precision_training_step_on(
    device: torch.device,
    precision: str,
    shapes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """One optimizer step under Accelerate's autocast, finite losses, saved weights on the host. On the CPU,
    Accelerate autocasts bf16 only: its fp16 setting trains in float32 there (fp16 autocast is a GPU feature)."""
    _train_on(device, monkeypatch)
    dtypes = _record_head_dtypes(monkeypatch)
    result = train(_config(shapes, tmp_path / "run", mixed_precision=precision))
    assert result.step == 1
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else torch.float32}
    assert dtypes and set(dtypes) == {expected[precision]}
    row = result.history[-1]
    assert all(math.isfinite(row[name]) for name in LOGGED_LOSSES), row
    assert (result.last_dir / "model.safetensors").is_file()
    said = "fp16 needs a CUDA GPU" in capsys.readouterr().err  # float32 in place of fp16 is said, not silent
    assert said == (precision == "fp16" and device.type == "cpu")


def _to_device(value, device: str):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _save_as_if_on(state: dict, device: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save `state` as a process on `device` writes it. Without that device here (a CUDA file on a CPU-only
    machine), the tensors stay on the CPU and only the file's storage location says cuda:0, which is all
    torch.load looks at."""
    if device == "cuda" and not torch.cuda.is_available():
        with monkeypatch.context() as patch:
            patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            torch.save(state, path)
    else:
        torch.save(_to_device(state, device), path)


def test_a_run_saved_on_another_device_resumes_on(
    device: torch.device, shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train_on(device, monkeypatch)
    output = tmp_path / "run"
    first = train(_config(shapes, output, epochs=2))
    assert first.step == 1
    optimizer_file = output / "state" / "optimizer.pt"
    state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
    assert any(torch.is_tensor(t) and t.dim() > 0 for s in state["state"].values() for t in s.values())
    other = "cpu" if device.type == "cuda" else "cuda"
    _save_as_if_on(state, other, optimizer_file, monkeypatch)

    loaded_on: set[str] = set()
    load_state = train_module._load_state

    def load_and_look(run, state_dir):
        load_state(run, state_dir)
        moments = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        loaded_on.update(t.device.type for t in moments)

    monkeypatch.setattr(train_module, "_load_state", load_and_look)
    second = train(resume_config(output, max_steps=2))
    assert loaded_on == {device.type}
    assert second.step == 2 and second.epochs_completed == 2


# ------------------------------------------------------------------------------------------ device reads (syncs)


class _DeviceReads:
    """Counts, while `active`, what would make the host wait for a GPU, called from our code (lwdetr/ and
    finetune/train.py): reading a value (item, bool, tolist, float, int, cpu) and a blocking host-to-device copy
    (`.to(device)` without non_blocking, `torch.tensor(..., device=...)`). On the CPU nothing waits; the counts say
    what a GPU would."""

    VALUE_READS = ("item", "__bool__", "tolist", "__float__", "__int__", "cpu")

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.counts: collections.Counter = collections.Counter()
        self.active = False
        for name in self.VALUE_READS:
            self._wrap(monkeypatch, torch.Tensor, name, lambda *args, **kwargs: True)
        self._wrap(monkeypatch, torch.Tensor, "to", self._blocking_copy)
        self._wrap(monkeypatch, torch, "tensor", lambda *args, **kwargs: kwargs.get("device") is not None)
        self._wrap(monkeypatch, torch, "as_tensor", lambda *args, **kwargs: kwargs.get("device") is not None)

    @staticmethod
    def _blocking_copy(tensor, *args, **kwargs) -> bool:
        if kwargs.get("non_blocking") or any(arg is True for arg in args[1:]):
            return False
        target = kwargs.get("device", args[0] if args else None)
        return isinstance(target, (str, torch.device))

    def _wrap(self, monkeypatch, owner, name: str, counts_when) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.active and counts_when(*args, **kwargs):
                caller = sys._getframe(1)
                where = Path(caller.f_code.co_filename).resolve()
                ours = where.is_relative_to(REPOSITORY / "lwdetr") or where == REPOSITORY / "finetune" / "train.py"
                if ours and caller.f_code.co_name != "epoch_batches":  # a host-side permutation
                    self.counts[(name, where.name, caller.f_code.co_name)] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    def total(self) -> int:
        return sum(self.counts.values())


def test_training_steps_read_little_more_than_the_matching_costs(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three steps with the GPU code paths (`reads_are_free` says no): per step, the matcher's one cost matrix per
    output level, the pixel mask and the labels' range check (both on the host: the data loader's tensors); and
    one read of the logged losses at the end of each epoch (2 steps here). Before: 28 per step (a bool per level
    and kind of saturated sigmoid, an item per logged loss, blocking copies of every label, the mask tested on the
    device...)."""
    monkeypatch.setattr(host_sync, "reads_are_free", lambda tensor: False)
    reads = _DeviceReads(monkeypatch)
    train_epoch = train_module._train_epoch

    def counted_epoch(*args, **kwargs):
        reads.active = True
        try:
            return train_epoch(*args, **kwargs)
        finally:
            reads.active = False

    monkeypatch.setattr(train_module, "_train_epoch", counted_epoch)
    steps = 3
    result = train(_config(shapes, tmp_path / "run", epochs=2, max_steps=steps))
    assert result.step == steps
    config = train_module.build_model(_config(shapes, tmp_path), {0: "a"}).config
    levels = config.decoder_layers + 1  # every decoder layer (auxiliary loss) and the encoder proposals
    matcher_reads = sum(n for (name, file, _), n in reads.counts.items() if file == "matcher.py")
    assert matcher_reads == steps * levels, reads.counts
    assert reads.total() <= steps * (levels + 2) + 2, reads.counts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_training_steps_synchronise_little_more_than_the_matching_costs(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same count on a real GPU, by CUDA's own synchronisation warnings."""
    train_epoch = train_module._train_epoch
    caught: list[warnings.WarningMessage] = []

    def counted_epoch(*args, **kwargs):
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return train_epoch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                caught.extend(r for r in records if "synchroniz" in str(r.message))

    monkeypatch.setattr(train_module, "_train_epoch", counted_epoch)
    steps = 3
    result = train(_config(shapes, tmp_path / "run", epochs=2, max_steps=steps))
    assert result.step == steps
    levels = train_module.build_model(_config(shapes, tmp_path), {0: "a"}).config.decoder_layers + 1
    assert len(caught) <= steps * (levels + 2) + 2, [str(w.message)[:100] for w in caught]


def test_labels_are_checked_on_the_host_and_copied_without_reading_the_device() -> None:
    """The meta device holds no values: any read of a label there would raise."""
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])},
        {"class_labels": [], "boxes": []},
    ]
    targets = _prepare_targets(labels, 2, 3, torch.device("meta"))
    assert targets.boxes.device.type == "meta" and targets.boxes.shape == (2, 4)
    assert targets.per_image[0]["class_labels"].device.type == "meta" and targets.offsets == [0, 2]
    labels[0]["class_labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"labels\[0\]\['class_labels'\] holds 3, outside \[0, num_labels=3\)"):
        _prepare_targets(labels, 2, 3, torch.device("meta"))


def test_log_probs_off_the_host_read_nothing_and_equal_the_host_values(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.tensor([[[-120.0, -3.0, 0.0, 4.0, 20.0], [1.0, 2.0, 3.0, -1.0, -2.0]]])
    unsaturated = logits[:, 1:]
    host = [_log_probs(x, x.sigmoid()) for x in (logits, unsaturated)]
    meta = logits.to("meta")
    log_p, log_not_p = _log_probs(meta, meta.sigmoid())  # would raise on a bool() of a meta tensor
    assert log_p.shape == log_not_p.shape == logits.shape
    monkeypatch.setattr(host_sync, "reads_are_free", lambda tensor: False)
    for x, expected in zip((logits, unsaturated), host):
        for got, want in zip(_log_probs(x, x.sigmoid()), expected):
            assert torch.equal(got, want)  # bit for bit: the select picks log() wherever the sigmoid is not 0 or 1
            assert torch.isfinite(got).all()


def test_a_mask_off_the_host_is_not_read_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = twin_models("nano")
    model.eval()
    step = model.model.backbone.backbone.size_divisor
    pixels = torch.randn(1, 3, 6 * step, 6 * step)
    with torch.no_grad():
        unmasked = model(pixels).logits
        monkeypatch.setattr(host_sync, "reads_are_free", lambda tensor: False)
        reads = _DeviceReads(monkeypatch)
        reads.active = True
        masked = model(pixels, torch.ones(1, 6 * step, 6 * step, dtype=torch.long)).logits
        reads.active = False
    assert reads.total() == 0, reads.counts
    assert relative_error(masked, unmasked) < 1e-5


def test_logged_losses_are_read_every_few_steps_off_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_sync, "reads_are_free", lambda tensor: False)
    progress = Progress()
    run = SimpleNamespace(progress=progress, plan=SimpleNamespace(total_steps=100, batches_per_epoch=50))
    log = loss_log.LossLog(run)
    reported = []
    for step in range(1, loss_log.DEVICE_READ_EVERY + 1):
        progress.step, progress.batch_in_epoch = step, step
        log.add(torch.tensor([1.0, 0.5, 0.25, 0.25], dtype=torch.float64) * step)
        reported.append(log.read_if_due())
    assert all(r == {} for r in reported[:-1])
    steps = loss_log.DEVICE_READ_EVERY
    assert reported[-1]["loss"] == pytest.approx((steps + 1) / 2)  # the mean over the steps since the last read
    assert progress.loss_steps == steps and progress.loss_sums["loss"] == pytest.approx(steps * (steps + 1) / 2)
    log.add(torch.tensor([math.nan, 0.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(FloatingPointError, match="the loss became nan"):
        log.read()


# ---------------------------------------------------------------------------------------- benchmark and GPU check


def test_the_benchmark_says_what_it_runs_on_without_avx512(tmp_path: Path) -> None:
    """An AVX2-only machine, as far as our kernels, PyTorch and oneDNN can tell: the benchmark still starts, and
    says that no compiled kernel is active and which capability PyTorch uses."""
    env = {**os.environ, "LWDETR_CPU_KERNELS": "0", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    output = tmp_path / "machine.json"
    command = [sys.executable, str(REPOSITORY / "benchmarks" / "bench.py"), "--machine", "--json", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    machine = json.loads(output.read_text())["machine"]
    assert machine["cpu"] and machine["device"] == "cpu"
    assert machine["kernels"] and not any(machine["kernels"].values())
    if "avx2" in machine["isa"]:
        assert machine["torch_cpu_capability"] == "AVX2"
    assert machine["environment"]["LWDETR_CPU_KERNELS"] == "0"
    lines = done.stdout.splitlines()
    assert lines[0] == f"CPU: {machine['cpu']}"
    assert "compiled kernels active: none (PyTorch fallbacks)" in lines


def test_the_gpu_check_says_clearly_when_there_is_no_gpu(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", REPOSITORY / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 2
    out = capsys.readouterr().out
    assert out.startswith("gpu_check: no CUDA device visible to torch") and "nothing was checked" in out
    assert gpu_check.table(["a", "bb"], [["xyz", "1"]]).splitlines() == ["a   | bb", "----+---", "xyz | 1 "]
