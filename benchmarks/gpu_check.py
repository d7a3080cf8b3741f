"""The GPU check in one command: the CUDA cases of the tests, then the benchmark on the GPU, then one table.

    python benchmarks/gpu_check.py            # tests + the benchmark in float32 and under autocast
    python benchmarks/gpu_check.py --quick    # tests + a smoke benchmark (small inputs, few repeats, no compile)

The tests are those marked `gpu` (`pytest -m gpu`: the `device` fixture's cuda cases in tests/test_devices.py:
parity with the reference, the Detector in float32/bfloat16/float16, a mixed-precision training step, a resume on
another device, synchronisations per training step). The benchmark runs twice, `--device cuda` in float32 and with
`--autocast` bf16 (fp16 on GPUs without bf16, such as the T4).

Exit status: 0 when every test passed and both benchmark runs finished; 1 when something failed; 2 when there is
no CUDA device (then nothing was checked: the message says why).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]


def run_tests(junit: Path) -> list[tuple[str, str, float]]:
    """(test id, outcome, seconds) of every GPU test."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPOSITORY, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if not junit.is_file():
        return [("pytest", "did not run", 0.0)]
    results = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            if case.find(kind) is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
        results.append((case.get("name", "?"), outcome, float(case.get("time", 0))))
    return results


def run_benchmark(autocast: str, quick: bool, output: Path) -> list[dict] | None:
    """The benchmark's rows on the GPU, or None when it failed."""
    command = [sys.executable, str(REPOSITORY / "benchmarks" / "bench.py"), "--device", "cuda"]
    command += ["--autocast", autocast, "--json", str(output)]
    if quick:
        command += ["--quick", "--skip", "compile"]
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPOSITORY, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if done.returncode != 0 or not output.is_file():
        return None
    return json.loads(output.read_text())["rows"]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke benchmark instead of the full one")
    parser.add_argument("--skip-bench", action="store_true", help="run the GPU tests only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} ({build}); nothing was checked.")
        print("Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch.")
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    with tempfile.TemporaryDirectory() as tmp:
        tests = run_tests(Path(tmp) / "junit.xml")
        benches = {}
        if not args.skip_bench:
            for autocast in ("none", half):
                benches[autocast] = run_benchmark(autocast, args.quick, Path(tmp) / f"bench_{autocast}.json")

    print("\nGPU tests")
    print(table(["test", "outcome", "s"], [[name, outcome, f"{seconds:.1f}"] for name, outcome, seconds in tests]))
    for autocast, rows in benches.items():
        print(f"\nbenchmark on cuda, autocast {autocast}")
        if rows is None:
            print("FAILED (see its output above)")
            continue
        lines = [
            [row["metric"], f"{row['reference']:.4g}", f"{row['ours']:.4g}", row["unit"], f"x{row['gain']:.2f}"]
            for row in rows
        ]
        print(table(["metric", "reference", "ours", "unit", "gain"], lines))
    failed = [name for name, outcome, _ in tests if outcome in ("FAILED", "ERROR", "did not run")]
    failed += [f"benchmark ({autocast})" for autocast, rows in benches.items() if rows is None]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all GPU checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
