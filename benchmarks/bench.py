"""Ours vs transformers' `LwDetrForObjectDetection`, with identical weights, in one process.

Every comparison runs the two implementations interleaved (A, B, A, B, ...) so that the noise of a shared machine
hits both alike, and reports medians and the gain: the median over rounds of reference / ours (> 1 means ours is
faster), a paired ratio in which the machine's slow and fast phases cancel out.

    python benchmarks/bench.py                 # the full run (a few minutes on 2 cores)
    python benchmarks/bench.py --quick         # a smoke run
    python benchmarks/bench.py --json out.json
    python benchmarks/bench.py --machine       # only what it would run on: CPU, ISA, kernels, GPU
    python benchmarks/bench.py --device cuda --autocast bf16    # on a GPU, both models under autocast

It runs on any CPU: the output (and the JSON) starts with the machine: the CPU model, its vector extensions, which of
our compiled kernels are active (the AVX-512 ones, the portable ones built for AVX2, or none with
LWDETR_CPU_KERNELS=0) and PyTorch's CPU capability; with `--device cuda`, the GPU. To see what an AVX2-only machine
gets on an AVX-512 one (our kernels, PyTorch and oneDNN all held to AVX2):

    LWDETR_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lwdetr.checkpoint import from_reference_state_dict  # noqa: E402
from lwdetr.config import preset_config  # noqa: E402
from lwdetr.modeling import LwDetrForObjectDetection  # noqa: E402

warnings.filterwarnings("ignore", message=".*You'd better set embed_dim.*")

NUM_LABELS = 91
# Where the models run (`--device`) and the autocast dtype of their forwards and training steps (`--autocast`).
DEVICE = torch.device("cpu")
AUTOCAST: torch.dtype | None = None
# The CPU's vector extensions that decide which fast paths exist (/proc/cpuinfo flag names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
ENVIRONMENT = ("LWDETR_CPU_KERNELS", "LWDETR_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo; elsewhere (macOS, Windows) what `platform` knows."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in (platform.processor(), platform.machine()):
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return name, flags


def _active_kernels() -> dict[str, bool]:
    """Which compiled CPU kernels the tiny preset would use on this machine (they compile on first call)."""
    from lwdetr.cpu.attention import attention_kernel
    from lwdetr.cpu.sampling import deformable_kernel

    config = preset_config("tiny", num_labels=NUM_LABELS)
    vit = config.backbone_config
    vit_head = vit.hidden_size // vit.num_attention_heads
    decoder_head = config.d_model // config.decoder_self_attention_heads
    sampling_head = config.d_model // config.decoder_cross_attention_heads
    probes = {
        f"ViT attention float32 (head {vit_head})": lambda: attention_kernel(vit_head),
        f"decoder self-attention float32 (head {decoder_head})": lambda: attention_kernel(decoder_head),
        f"ViT attention bfloat16 AMX (head {vit_head})": lambda: attention_kernel(vit_head, torch.bfloat16),
        f"deformable sampling float32 (head {sampling_head})": lambda: deformable_kernel(sampling_head),
    }
    active = {}
    for name, probe in probes.items():
        try:
            active[name] = probe() is not None
        except Exception as error:  # a broken compiler or cache must not stop the benchmark: the fallback runs
            print(f"  kernel {name}: {type(error).__name__}: {error}", file=sys.stderr)
            active[name] = False
    return active


def _kernel_status() -> str:
    """Which build of our kernels runs (AVX-512, or portable and for which width), after `_active_kernels`."""
    from lwdetr.cpu import kernel_status

    return kernel_status()


def machine_info() -> dict:
    """What the numbers were measured on: CPU, ISA, active kernels, PyTorch's capability and, on a GPU, the GPU."""
    name, flags = _cpu_model_and_flags()
    info = {
        "cpu": name,
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": _active_kernels(),
        "kernel_status": _kernel_status(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "environment": {key: os.environ[key] for key in ENVIRONMENT if key in os.environ},
        "device": str(DEVICE),
        "autocast": str(AUTOCAST).removeprefix("torch.") if AUTOCAST else None,
    }
    if DEVICE.type == "cuda":
        properties = torch.cuda.get_device_properties(DEVICE)
        info["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return info


def print_machine(info: dict) -> None:
    print(f"CPU: {info['cpu']}")
    print(f"ISA: {' '.join(info['isa']) or 'none of ' + ' '.join(ISA_FLAGS)}")
    print(f"torch {info['torch']}, CPU capability {info['torch_cpu_capability']}, {info['threads']} threads")
    kernels = [name for name, on in info["kernels"].items() if on]
    print(f"compiled kernels active: {', '.join(kernels) if kernels else 'none (PyTorch fallbacks)'}")
    if info.get("kernel_status"):
        print(info["kernel_status"])
    if info["environment"]:
        print("environment: " + " ".join(f"{key}={value}" for key, value in info["environment"].items()))
    if "gpu" in info:
        gpu = info["gpu"]
        print(f"GPU: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']})")
    print(f"device {info['device']}, autocast {info['autocast'] or 'off'}", flush=True)


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _autocast():
    """The `--autocast` context of every forward and training step (none by default)."""
    if AUTOCAST is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=AUTOCAST)


def _on_device(fn: Callable[[], object], autocast: bool = True) -> Callable[[], object]:
    """`fn` under the `--autocast` (when `autocast`), finished on the device when it returns (a GPU runs
    asynchronously)."""

    def run() -> object:
        with _autocast() if autocast else contextlib.nullcontext():
            result = fn()
        _synchronize()
        return result

    return run


def build_pair(preset: str, seed: int = 0) -> tuple[torch.nn.Module, LwDetrForObjectDetection]:
    """(reference, ours) in eval mode on `DEVICE`, ours loaded from the reference's (slightly perturbed) weights."""
    import transformers

    config = preset_config(preset, num_labels=NUM_LABELS)
    torch.manual_seed(seed)
    reference = transformers.LwDetrForObjectDetection(config)
    with torch.no_grad():  # move the zero-initialised box heads off zero so boxes differ between queries
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    ours = LwDetrForObjectDetection(config)
    ours.load_state_dict(from_reference_state_dict(reference.state_dict()), strict=True)
    return reference.to(DEVICE).eval(), ours.to(DEVICE).eval()


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, autocast: bool = True
) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved round-robin: one list per function, one entry per round.

    Every other round runs the functions in reverse order, so that neither side always runs right after the other
    (a training step, for one, starts on whatever memory the previous step's allocations left behind). Each call
    runs under the `--autocast` (unless `autocast` is False) and, on a GPU, is timed until the device has finished.
    """
    fns = {name: _on_device(fn, autocast) for name, fn in fns.items()}
    _synchronize()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for round_index in range(repeats):
        for name, fn in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def paired_gain(times: dict[str, list[float]], ours: str, reference: str = "reference") -> float:
    """Median over rounds of reference / ours: each ratio compares two calls made back to back, so the slow and fast
    phases of a shared machine (which move a whole run's medians by +-15 % here) cancel out of it."""
    return statistics.median(r / o for r, o in zip(times[reference], times[ours]))


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul throughput (FLOP/s) with the current thread count: best of a few big matmuls."""
    a, b = torch.randn(size, size, device=DEVICE), torch.randn(size, size, device=DEVICE)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn: Callable[[], object]) -> float:
    _synchronize()
    start = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - start


def forward_flops(model: torch.nn.Module, pixels: torch.Tensor) -> int:
    # FlopCounterMode's module tracker hooks autograd; with parameters frozen it needs no graph at all
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            model(pixel_values=pixels)
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
    return counter.get_total_flops()


def _rss_kib(field: str) -> int:
    with contextlib.suppress(OSError), open("/proc/self/status") as status:  # Linux only; 0 elsewhere
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def training_peak_rss_mib(which: str, preset: str, batch: int, size: int) -> float:
    """Peak resident memory (VmHWM) of a fresh process that builds one model and runs two training steps; on a GPU,
    the peak of the device memory allocated instead.

    A fresh process per model, because inside one long-lived process the allocator's cached memory makes the
    increase of RSS during a step say more about the steps before it than about the step itself.
    """
    command = [sys.executable, __file__, *_device_arguments(), "--probe-train-memory", which, preset, str(batch)]
    command.append(str(size))
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _probe_train_memory(which: str, preset: str, batch: int, size: int) -> None:
    reference, ours = build_pair(preset)
    model = ours if which == "ours" else reference
    del reference, ours
    model.train()
    pixels = torch.randn(batch, 3, size, size, device=DEVICE)
    step = _on_device(train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-6), pixels, random_labels(batch)))
    step()
    step()
    if DEVICE.type == "cuda":
        print(torch.cuda.max_memory_allocated(DEVICE) / 2**20)
    else:
        print(_rss_kib("VmHWM") / 1024)


def _device_arguments() -> list[str]:
    """The `--device` and `--autocast` of this run, for the probe processes."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "none"}
    return ["--device", str(DEVICE), "--autocast", names[AUTOCAST]]


def random_labels(batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for _ in range(batch):
        n = 6
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        classes = torch.randint(0, NUM_LABELS, (n,), generator=generator)
        labels.append({"class_labels": classes.to(DEVICE), "boxes": torch.cat((centres, sizes), -1).to(DEVICE)})
    return labels


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pixels, labels) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()

    return step


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(
        self,
        name: str,
        reference: float,
        ours: float,
        unit: str,
        higher_is_better: bool = False,
        gain: float | None = None,
        times: dict[str, list[float]] | None = None,
    ) -> None:
        """One row; `gain` (ours better when > 1) defaults to the ratio of the two figures. `times`, the seconds of
        every interleaved round, go into the JSON so that the gain can be recomputed (and checked against the
        medians, from which it can stray when the machine changes speed during a run)."""
        if gain is None:
            gain = ours / reference if higher_is_better else reference / ours
        row = {"metric": name, "reference": reference, "ours": ours, "unit": unit, "gain": gain}
        if times is not None:
            row["seconds_per_round"] = times
        self.rows.append(row)
        print(f"  {name}: reference {reference:.4g} {unit}, ours {ours:.4g} {unit}, gain x{gain:.2f}", flush=True)

    def markdown(self) -> str:
        lines = ["| metric | reference | ours | unit | gain (>1 = ours better) |", "|---|---|---|---|---|"]
        for row in self.rows:
            lines.append(
                f"| {row['metric']} | {row['reference']:.4g} | {row['ours']:.4g} | {row['unit']} | x{row['gain']:.2f} |"
            )
        return "\n".join(lines)


def latency_times(preset: str, batch: int, repeats: int, size: int) -> dict[str, list[float]]:
    """Interleaved forward times of the reference and ours (inference mode); prints how far their logits differ."""
    reference, ours = build_pair(preset)
    pixels = torch.randn(batch, 3, size, size, device=DEVICE)
    with torch.inference_mode():
        fns = {"reference": lambda: reference(pixel_values=pixels), "ours": lambda: ours(pixel_values=pixels)}
        times = interleaved_times(fns, repeats)
        diff = (reference(pixel_values=pixels).logits - ours(pixel_values=pixels).logits).abs().max().item()
    print(f"  {preset} batch {batch}: max |logits diff| {diff:.2e}", file=sys.stderr, flush=True)
    return times


def bench_latency(report: Report, preset: str, batch: int, repeats: int, size: int = 640) -> None:
    times = latency_times(preset, batch, repeats, size)
    median, gain = medians(times), paired_gain(times, "ours")
    if batch == 1:
        report.add(
            f"latency {preset} b1 {size}", median["reference"] * 1e3, median["ours"] * 1e3, "ms", gain=gain, times=times
        )
    else:
        report.add(
            f"throughput {preset} b{batch} {size}",
            batch / median["reference"],
            batch / median["ours"],
            "img/s",
            higher_is_better=True,
            gain=gain,
            times=times,
        )


def bench_fresh_latency(report: Report, preset: str, repeats: int, size: int = 640) -> None:
    """Batch-1 latency in a fresh process, before anything has warmed glibc's malloc.

    The other rows run after the peak matmul has freed a 16 MB block, which raises glibc's mmap threshold: from then
    on freed memory is reused without page faults, the state of any process that has handled a large image. In a
    fresh process every large temporary is a new mapping that page-faults on first touch; the reference, with many
    more temporaries per forward, pays for that much more than ours.
    """
    command = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), *_device_arguments()]
    command += ["--probe-fresh-latency", preset, str(repeats), str(size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    times = json.loads(result.stdout.strip().splitlines()[-1])
    median = medians(times)
    name = f"latency {preset} b1 {size}, fresh process"
    report.add(
        name, median["reference"] * 1e3, median["ours"] * 1e3, "ms", gain=paired_gain(times, "ours"), times=times
    )


def bench_compiled(report: Report, preset: str, repeats: int, size: int = 640) -> None:
    """Ours under `torch.compile` (inductor, frozen weights, as `Detector(compile=True)`) vs the eager reference."""
    reference, ours = build_pair(preset)
    pixels = torch.randn(1, 3, size, size, device=DEVICE)
    compiled = torch.compile(ours, options={"freezing": True})
    with torch.inference_mode(), _autocast():
        start = time.perf_counter()
        got = compiled(pixel_values=pixels).logits
        print(f"  {preset} compiled in {time.perf_counter() - start:.0f} s", flush=True)
        diff = (reference(pixel_values=pixels).logits - got).abs().max().item()
        fns = {"reference": lambda: reference(pixel_values=pixels), "ours": lambda: compiled(pixel_values=pixels)}
        times = interleaved_times(fns, repeats)
    print(f"  {preset} compiled: max |logits diff| {diff:.2e}")
    median = medians(times)
    name = f"latency {preset} b1 {size}, ours compiled"
    report.add(
        name, median["reference"] * 1e3, median["ours"] * 1e3, "ms", gain=paired_gain(times, "ours"), times=times
    )


def bench_flops(report: Report, preset: str, repeats: int, size: int = 640) -> None:
    """Forward FLOPs (FlopCounterMode) and the fraction of the machine's matmul peak that each forward reaches.

    The peak is a 2048^3 matmul timed in the same interleaved rounds as the forwards, so both see the same machine.
    """
    reference, ours = build_pair(preset)
    pixels = torch.randn(1, 3, size, size, device=DEVICE)
    flops = {"reference": forward_flops(reference, pixels), "ours": forward_flops(ours, pixels)}
    a, b = torch.randn(2048, 2048, device=DEVICE), torch.randn(2048, 2048, device=DEVICE)
    fns = {"reference": lambda: reference(pixel_values=pixels), "ours": lambda: ours(pixel_values=pixels)}

    def matmul() -> torch.Tensor:
        with torch.autocast(DEVICE.type, enabled=False):  # the float32 peak, whatever the --autocast
            return a @ b

    with torch.inference_mode():
        times = interleaved_times({**fns, "matmul": matmul}, repeats)
    peak = 2 * 2048**3 / min(times["matmul"])
    median = medians(times)
    report.add(f"forward GFLOPs {preset} b1", flops["reference"] / 1e9, flops["ours"] / 1e9, "GFLOP")
    fraction = {name: flops[name] / median[name] / peak for name in fns}
    report.add(
        f"fraction of fp32 matmul peak {preset} b1", fraction["reference"], fraction["ours"], "", higher_is_better=True
    )


def bench_training(report: Report, preset: str, batch: int, repeats: int, size: int = 640) -> None:
    reference, ours = build_pair(preset)
    reference.train()
    ours.train()
    pixels = torch.randn(batch, 3, size, size, device=DEVICE)
    labels = random_labels(batch)
    steps = {
        "reference": train_step(reference, torch.optim.AdamW(reference.parameters(), lr=1e-6), pixels, labels),
        "ours": train_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-6), pixels, labels),
    }
    times = interleaved_times(steps, repeats)
    median, gain = medians(times), paired_gain(times, "ours")
    report.add(
        f"train step {preset} b{batch} {size} (group DETR)",
        median["reference"],
        median["ours"],
        "s",
        gain=gain,
        times=times,
    )
    memory = {name: training_peak_rss_mib(name, preset, batch, size) for name in ("reference", "ours")}
    what = "peak CUDA memory" if DEVICE.type == "cuda" else "peak RSS"
    report.add(f"{what} of a process training {preset} b{batch} {size}", memory["reference"], memory["ours"], "MiB")


def _model_folder(preset: str, directory: Path, size: int) -> Path:
    """An HF-format folder (weights + image processor) that both `Detector` and transformers' pipeline load."""
    from lwdetr.processing import LwDetrImageProcessor

    _, ours = build_pair(preset)
    with torch.no_grad():  # spread the class scores so that the top detections are well separated
        ours.class_embed.weight.normal_(0, 0.2)
    ours.save_pretrained(directory)
    LwDetrImageProcessor(size={"height": size, "width": size}).save_pretrained(directory)
    return directory


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def detections_agree(ours, theirs, top: int = 100) -> float:
    """Fraction of the reference's top detections found in ours: same label, IoU >= 0.9, score within 0.02."""
    theirs = sorted(theirs, key=lambda d: -d["score"])[:top]
    if not theirs:
        return 1.0
    mine = sorted(ours, key=lambda d: -d.score)[:top]
    if not mine:
        return 0.0
    boxes = np.array([d.box for d in mine])
    found = 0
    for det in theirs:
        b = det["box"]
        box = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]]], dtype=float)
        iou = _box_iou(boxes, np.repeat(box, len(boxes), 0))
        ok = [
            iou[i] >= 0.9 and mine[i].label == det["label"] and abs(mine[i].score - det["score"]) <= 0.02
            for i in range(len(mine))
        ]
        found += any(ok)
    return found / len(theirs)


def bench_end_to_end(report: Report, preset: str, repeats: int, num_images: int, size: int = 640) -> None:
    """`Detector.predict` (fp32, bf16, and fp16 on a GPU) vs `transformers.pipeline("object-detection")` in fp32."""
    import transformers
    from PIL import Image

    from lwdetr.detector import Detector

    with tempfile.TemporaryDirectory() as tmp:
        folder = _model_folder(preset, Path(tmp), size)
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(num_images)]
        pipe = transformers.pipeline("object-detection", model=str(folder), device=DEVICE)
        dtypes = ["float32", "bfloat16"] + (["float16"] if DEVICE.type == "cuda" else [])
        detectors = {}
        for dtype in dtypes:  # a precision this machine cannot run loses its own row only
            try:
                detector = Detector.from_pretrained(folder, device=DEVICE, dtype=dtype)
                detector.predict(images[0])  # some kernels are chosen (and may fail) on the first call
                detectors[dtype] = detector
            except Exception as error:
                print(f"  detector {dtype}: {type(error).__name__}: {error}", flush=True)
        fns = {"reference": lambda: pipe(images, threshold=0.0)}
        for name, detector in detectors.items():
            fns[name] = lambda d=detector: d.predict(images, threshold=0.0, max_detections=100)
        times = interleaved_times(fns, repeats, autocast=False)  # each side in its own precision, as named
        median = medians(times)
        theirs = pipe(images, threshold=0.0)
        for name in detectors:
            agreement = np.mean([detections_agree(o, t) for o, t in zip(fns[name](), theirs)])
            print(f"  detector {name}: {agreement:.1%} of the reference's top-100 detections matched")
            report.add(
                f"end to end {preset} {num_images} images, Detector {name} vs pipeline fp32",
                median["reference"],
                median[name],
                "s",
                gain=paired_gain(times, name),
                times={"reference": times["reference"], name: times[name]},
            )


def bench_onnx(report: Report, preset: str, repeats: int, size: int = 640) -> None:
    """onnxruntime (CPU) on our exported model vs the reference in PyTorch, batch 1."""
    import onnxruntime as ort

    from lwdetr.onnx_export import export_onnx

    reference, ours = build_pair(preset)
    pixels = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(ours, Path(tmp) / "model.onnx", image_size=(size, size))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: pixels.numpy()}
        with torch.inference_mode():
            times = interleaved_times(
                {"reference": lambda: reference(pixel_values=pixels), "onnx": lambda: session.run(None, feed)}, repeats
            )
    name = f"latency {preset} b1 {size}, onnxruntime vs reference torch"
    median = medians(times)
    report.add(
        name, median["reference"] * 1e3, median["onnx"] * 1e3, "ms", gain=paired_gain(times, "onnx"), times=times
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats, small inputs: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--machine", action="store_true", help="print the machine, ISA and active kernels; no timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N): where both models run")
    parser.add_argument(
        "--autocast", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype of both models' passes"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], help="sections to skip: latency fresh compile train flops e2e onnx"
    )
    parser.add_argument(
        "--probe-train-memory", nargs=4, metavar=("WHICH", "PRESET", "BATCH", "SIZE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--probe-fresh-latency", nargs=3, metavar=("PRESET", "REPEATS", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, AUTOCAST
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.exit(
            2,
            f"--device {args.device}: no CUDA device here (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'})\n",
        )
    AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    if args.probe_train_memory:
        which, preset, batch, size = args.probe_train_memory
        _probe_train_memory(which, preset, int(batch), int(size))
        return
    if args.probe_fresh_latency:
        preset, repeats, size = args.probe_fresh_latency
        print(json.dumps(latency_times(preset, 1, int(repeats), int(size))))
        return
    # single forwards take ~0.2 s: many repeats, because this kind of shared machine is noisy (+-10 % per call)
    repeats = 2 if args.quick else 21
    size = 320 if args.quick else 640

    report = Report()
    machine = machine_info()
    print_machine(machine)
    if args.machine:
        if args.json:
            args.json.write_text(json.dumps({"machine": machine}, indent=2))
        return
    # besides the peak, this warms glibc's malloc (see bench_fresh_latency): all rows but that one run warm
    peak = matmul_peak_flops(1024 if args.quick else 2048)
    print(f"threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    # CPU-only sections: glibc's malloc in a fresh process, onnxruntime's CPU provider
    skip = set(args.skip) | ({"fresh", "onnx"} if DEVICE.type == "cuda" else set())
    sections: list[tuple[str, Callable[[], None]]] = [
        ("latency", lambda: bench_latency(report, "tiny", 1, repeats, size)),
        ("latency", lambda: bench_latency(report, "small", 1, repeats, size)),
        ("latency", lambda: bench_latency(report, "tiny", 8 if not args.quick else 2, max(2, repeats // 3), size)),
        ("fresh", lambda: bench_fresh_latency(report, "tiny", repeats, size)),
        ("compile", lambda: bench_compiled(report, "tiny", repeats, size)),
        ("compile", lambda: bench_compiled(report, "small", repeats, size)),
        ("train", lambda: bench_training(report, "tiny", 4 if not args.quick else 2, max(2, repeats // 2), size)),
        ("flops", lambda: bench_flops(report, "tiny", repeats, size)),
        ("e2e", lambda: bench_end_to_end(report, "tiny", max(2, repeats // 2), 2 if args.quick else 4, size)),
        ("onnx", lambda: bench_onnx(report, "tiny", repeats, size)),
    ]
    for name, run in sections:
        if name in skip:
            continue
        try:
            run()
        except Exception as error:  # one failing section should not lose the others' numbers
            print(f"  section {name} failed: {type(error).__name__}: {error}", flush=True)

    print()
    print(f"threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, torch {torch.__version__}")
    print_machine(machine)
    print(report.markdown())
    if args.json:
        payload = {"machine": machine, "threads": torch.get_num_threads(), "matmul_peak_flops": peak}
        payload["rows"] = report.rows
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
