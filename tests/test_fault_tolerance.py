"""A fine-tuning run survives `kill -9` at any moment, damaged checkpoints and a full disk, and `--resume` works in
every documented form (`--resume --output RUN`, `--resume` inside the run folder, a moved run, a copied run).

The kills are real: `python -m finetune` runs as a child process and sends itself SIGKILL at a named crash point
(`FINETUNE_CRASH_AT`, see `finetune.faults`). Every resumed run must end exactly like an uninterrupted one: every
epoch once in metrics.jsonl, the same plots and card, no temporary files, bit-identical weights.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.__main__ import main
from finetune.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
CRASH_ENV = "FINETUNE_CRASH_AT"  # finetune.faults: kill at the N-th pass through a named crash point
# 16 train images in batches of 4: 4 steps per epoch, 8 in all.
RUN_ARGS = "--model nano --epochs 2 --batch-size 4 --image-size 128 --num-workers 0 --no-multi-scale --warmup-steps 2"
RUN_ARGS = RUN_ARGS.split()
# The killed runs also save state/ after steps 3 and 6 (which changes no weight).
KILLED_ARGS = [*RUN_ARGS, "--save-every-steps", "3"]
WEIGHT_FILES = ("last/model.safetensors", "best/model.safetensors", "state/model/model.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault") / "shapes"
    make_synthetic_dataset(root, num_train=16, num_val=8, image_size=64, seed=1)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The run never interrupted (its state.prev/ is the epoch-1 state, saved at step 4)."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert main(["--data", str(data), *RUN_ARGS, "--output", str(output)]) == 0
    return output


def _killed_run(data: Path, output: Path, crash: str) -> None:
    """`python -m finetune` into `output`, killed (SIGKILL) at crash point `crash` ("NAME:N")."""
    env = {**os.environ, CRASH_ENV: crash, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "finetune", "--data", str(data), *KILLED_ARGS, "--output", str(output)]
    done = subprocess.run(command, cwd=output.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def _state_step(output: Path, name: str = "state") -> int:
    return json.loads((output / name / "trainer.json").read_text())["step"]


def _error_line(stderr: str) -> str:
    """The one `error: ...` line of a failed command (other lines: the CPU kernels, the progress bar)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def _same_card(run: Path, reference: Path, *names: str) -> bool:
    """README.md of both runs, equal once the run folders' names and the killed runs' --save-every-steps (in the
    command and the settings) are set aside."""

    def plain(text: str, names: tuple[str, ...]) -> str:
        for name in names:
            text = text.replace(name, "RUN")
        lines = text.replace(" --save-every-steps 3", "").splitlines()
        return "\n".join(line for line in lines if "save_every_steps" not in line)

    return plain((run / "README.md").read_text(), names) == plain(
        (reference / "README.md").read_text(), (str(reference),)
    )


def _assert_like_reference(run: Path, reference: Path) -> None:
    """Every epoch once in metrics.jsonl (equal but for times), the same plots, no leftovers, identical weights."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == [
        {k: v for k, v in r.items() if k != "time"} for r in expected
    ]
    for plot in ("loss.png", "ap.png"):
        assert (run / plot).read_bytes() == (reference / plot).read_bytes(), plot
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".") or p.name.endswith((".old", ".tmp"))]
    assert leftovers == []
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["analysis", "best", "last", "state", "state.prev"]
    assert _state_step(run) == 8
    for name in (*WEIGHT_FILES, "state/ema.safetensors"):
        ours, theirs = load_file(str(run / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


# ------------------------------------------------------------------------------------------ kill -9, then resume


def test_kill_between_the_renames_of_state_then_resume_with_output(data, reference, tmp_path, monkeypatch):
    """Killed at the end of epoch 1 with the step-3 state renamed aside and the new one not yet in place."""
    run = tmp_path / "run"
    _killed_run(data, run, "state-swap:2")
    assert not (run / "state").exists() and (run / "state.old" / "trainer.json").is_file()
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", "--output", str(run)]) == 0
    _assert_like_reference(run, reference)
    assert _same_card(run, reference, str(run))


def test_kill_after_state_before_metrics_in_the_last_epoch_then_bare_resume(
    data, reference, tmp_path, monkeypatch, capsys
):
    """Killed after the last state/ was saved, before metrics.jsonl, plots and card: `--resume` inside the run
    folder trains nothing and brings every file to the last saved epoch; a killed write's temporary file goes."""
    run = tmp_path / "run"
    _killed_run(data, run, "epoch-saved:2")
    assert _state_step(run) == 8 and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    (run / ".metrics.jsonl.k1ll3d.tmp").write_text('{"epoch": 1}\n')
    monkeypatch.chdir(run)
    assert main(["--resume"]) == 0
    assert "done: 2 epochs, 8 steps" in capsys.readouterr().out
    _assert_like_reference(run, reference)
    assert _same_card(run, reference, str(run))


def test_kill_mid_epoch_resumes_a_copied_run_exactly_from_its_step_checkpoint(data, reference, tmp_path):
    """--save-every-steps: killed at step 7 (state saved after step 6, mid-epoch 2), the copy resumes with the same
    batches and random state and ends bit-identical; the original folder is left as it was."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    _killed_run(data, run, "step:7")
    assert _state_step(run) == 6
    shutil.copytree(run, copy)
    assert main(["--resume", "--output", str(copy)]) == 0
    _assert_like_reference(copy, reference)
    assert _same_card(copy, reference, str(run), str(copy))
    assert _state_step(run) == 6 and len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_kill_while_writing_a_step_checkpoint_then_resume_a_moved_run(data, reference, tmp_path):
    """Killed half-way through writing the step-6 state: the half-written folder is dropped, the run (moved to
    another folder meanwhile) resumes from the epoch-1 state into its new place."""
    run, moved = tmp_path / "run", tmp_path / "elsewhere" / "moved"
    _killed_run(data, run, "state-write:3")
    assert _state_step(run) == 4 and list(run.glob(".state.*.partial"))
    moved.parent.mkdir()
    run.rename(moved)
    assert main(["--resume", "--output", str(moved)]) == 0
    _assert_like_reference(moved, reference)
    assert _same_card(moved, reference, str(run), str(moved))
    assert not run.exists()


def test_what_kills_leave_is_repaired_by_a_resume_through_the_python_api(reference, tmp_path):
    """The leftovers of kills, laid out by hand in a copy of a finished run: state/ renamed aside, metrics.jsonl
    one epoch behind, temporary files and a half-written folder. `train(resume_config(RUN))` repairs all of it,
    in the folder given (not the one the run was saved from)."""
    from finetune.config import resume_config
    from finetune.train import train

    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    (run / "state").rename(run / "state.old")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    (run / ".metrics.jsonl.x1.tmp").write_text("")
    (run / ".loss.png.x2.png").write_bytes(b"")
    (run / ".last.x3.partial").mkdir()
    result = train(resume_config(run))
    assert result.output_dir == run and result.epochs_completed == 2 and result.step == 8
    _assert_like_reference(run, reference)
    assert _same_card(run, reference, str(run), str(reference))  # the command that started the run stays


# ------------------------------------------------------------------------------------------ damaged checkpoints


def test_a_truncated_state_falls_back_to_the_previous_checkpoint(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    weights = run / "state" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["--resume", "--output", str(run)]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "previous checkpoint" in line)
    assert str(weights) in line and "state.prev/ (saved at step 4)" in line and "Traceback" not in err
    _assert_like_reference(run, reference)
    # the damaged checkpoint is gone: the fallback is now the intact epoch-1 state
    assert _state_step(run, "state.prev") == 4
    assert load_file(str(run / "state.prev" / "model" / "model.safetensors"))


def test_no_intact_checkpoint_is_one_line_naming_the_file(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for name in ("state", "state.prev"):
        (run / name / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    assert main(["--resume", "--output", str(run)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert str(run / "state" / "optimizer.pt") in err and "no intact earlier checkpoint" in err


# ------------------------------------------------------------------------------------------ settings and folders


def test_resume_refuses_other_data_and_a_new_run_refuses_a_used_folder(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    other = tmp_path / "other"
    make_synthetic_dataset(other, num_train=4, num_val=2, image_size=64, seed=2)
    assert main(["--resume", "--output", str(run), "--data", str(other)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "--data differs" in err and "--output" in err and "--force" in err, err
    assert main(["--resume", "--output", str(run), "--data", str(data)]) == 0  # the same data is no change
    capsys.readouterr()

    before = (run / "metrics.jsonl").read_bytes()
    assert main(["--data", str(data), *RUN_ARGS, "--output", str(run)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "already holds a run" in err and "--resume" in err and "--force" in err
    assert (run / "metrics.jsonl").read_bytes() == before and _state_step(run) == 8

    assert main(["--data", str(data), *RUN_ARGS, "--output", str(run), "--force", "--max-steps", "1"]) == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["step"] == 1 and _state_step(run) == 1


def test_a_full_disk_is_one_line_and_keeps_the_saved_state(reference, tmp_path, capsys, monkeypatch):
    """The disk fills up while epoch 3 of an extended run saves its state: one line naming the run folder and the
    bytes needed; state/ stays the intact epoch-2 checkpoint and no half-written folder remains."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    real_save = torch.save

    def save(obj, file, *args, **kwargs):
        if Path(file).name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["--resume", "--output", str(run), "--epochs", "3", "--save-every-steps", "0"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: no space left") and str(run) in err and "bytes" in err
    assert _state_step(run) == 8 and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list(run.glob(".*")) and not (run / "state.old").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["--resume", "--output", str(run)]) == 0  # with room again, the run resumes from its state


def test_step_checkpoints_default_to_about_every_ten_minutes(monkeypatch, capsys):
    """Without --save-every-steps the interval is fixed from the steps this session timed (2 s each here: every
    300 steps, 10 minutes); an explicit N or 0 (epoch ends only) is used as given; --help says so."""
    from types import SimpleNamespace

    import finetune.checkpoints as checkpoints

    clock = [100.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])

    def run_with(every):
        accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
        config = SimpleNamespace(save_every_steps=every)
        return SimpleNamespace(
            config=config, accelerator=accelerator, progress=SimpleNamespace(step=0), save_every=None, timing_start=None
        )

    def saves(run, steps):
        due = []
        for _ in range(steps):
            run.progress.step += 1
            clock[0] += 2.0
            if checkpoints.step_save_due(run):
                due.append(run.progress.step)
        return due

    auto = run_with(None)
    assert saves(auto, 700) == [300, 600] and auto.save_every == checkpoints.AUTO_SAVE_SECONDS / 2.0
    assert saves(run_with(7), 21) == [7, 14, 21] and saves(run_with(0), 50) == []
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--save-every-steps" in text and "10 minutes" in text and "--force" in text
