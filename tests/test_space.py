"""The app as a Space: training in a child process (`python -m finetune`, `accelerate launch` on several GPUs),
stopped cleanly by a signal, surviving a `kill -9` of the child, and an app restart that lists earlier runs to their
owners and resumes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_app import REPO, fake_command, wait_for

from finetune.__main__ import config_from_args
from finetune.config import TrainConfig
from finetune.synthetic import make_synthetic_dataset
from lwdetr_app.handlers import AppContext
from lwdetr_app.models import ModelChoice, ModelRegistry
from lwdetr_app.runs import RunRecord, owner_key, read_record, write_record
from lwdetr_app.settings import AppSettings
from lwdetr_app.training import TrainingJob, read_events, train_command

ALICE = SimpleNamespace(username=None, session_hash="alice-session")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=128, seed=0)


def make_ctx(data_dir: Path, assets, job: TrainingJob | None = None) -> AppContext:
    model, examples, _ = assets
    settings = AppSettings(data_dir=data_dir, demo_model_dir=model, examples_dir=examples[0].parent)
    default = ModelChoice(str(model), "Bundled demo model (test)")
    return AppContext(settings, default, ModelRegistry(device="cpu"), job or TrainingJob(gpus=0))


@pytest.fixture
def ctx(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "data" / "gradio"))
    return make_ctx(tmp_path / "data", assets)


def test_train_command_is_finetunes_cli_and_accelerate_launch_on_several_gpus(tmp_path):
    config = TrainConfig(data="d", model="nano", epochs=3, batch_size=2, image_size=256, lr=2e-4, output=str(tmp_path))
    one = train_command(config, gpus=0)
    assert one[:3] == [sys.executable, "-m", "finetune"]
    # finetune's own reading of the arguments gives back the config (data loader workers: the child's auto choice).
    given = config_from_args(one[3:])
    assert dataclasses.replace(given, command=None) == config and given.num_workers is None
    many = train_command(config, gpus=4)
    assert many[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert many[many.index("--num_processes") + 1] == "4" and many[many.index("finetune") - 1] == "-m"
    assert dataclasses.replace(config_from_args(many[many.index("finetune") + 1 :]), command=None) == config
    resume = train_command(TrainConfig(output=str(tmp_path), resume=True), gpus=0)
    assert resume[3:] == ["--output", str(tmp_path), "--resume"]


def test_owner_key_prefers_the_login_then_the_browser_token_then_the_session():
    token = "0123456789abcdef0123456789abcdef"
    assert owner_key(token, SimpleNamespace(username="alice", session_hash="s")) == "user:alice"
    by_token = owner_key(token, SimpleNamespace(username=None, session_hash="s"))
    assert by_token.startswith("browser:") and token not in by_token  # only a hash of the secret is kept
    forged = owner_key("../../etc", SimpleNamespace(username=None, session_hash="s"))
    assert forged.startswith("session:") and "s" != forged.split(":")[1]
    assert owner_key(None, None) is None


def test_sigterm_stops_finetune_with_its_state_saved(tmp_path, shapes):
    """`python -m finetune` writes events.jsonl and, on SIGTERM, saves last/ and state/ and exits 0."""
    run = tmp_path / "run"
    args = ["--data", str(shapes), "--model", "nano", "--output", str(run), "--epochs", "50", "--batch-size", "2"]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args, "--image-size", "128", "--num-workers", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: any(e["kind"] == "step" for e in read_events(run / "events.jsonl", 0)[0]), timeout=180)
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, output
    events = read_events(run / "events.jsonl", 0)[0]
    assert [e["kind"] for e in events][0] == "start" and events[-1]["kind"] == "stopped"
    assert (run / "state" / "trainer.json").is_file() and (run / "last" / "config.json").is_file()


def test_the_app_survives_kill_9_of_its_training_child(ctx, shapes, assets):
    config = TrainConfig(data=str(shapes), model="nano", epochs=50, batch_size=2, image_size=128)
    ctx.job.start(config, ctx.paths.runs, owner_key(None, ALICE))
    run_dir = Path(ctx.job.snapshot().run_dir)
    pid = read_record(run_dir).pid
    assert pid and pid != os.getpid()  # training runs in its own process
    wait_for(lambda: ctx.job.snapshot().step >= 1, timeout=180)
    os.kill(pid, signal.SIGKILL)
    assert ctx.job.wait(30)
    snap = ctx.job.snapshot()
    assert snap.state == "failed" and "killed (SIGKILL)" in snap.summary()
    assert read_record(run_dir).state == "failed"
    assert isinstance(ctx.detect_api(str(assets[1][0]), 0.5), list)  # the app keeps serving
    assert "failed" in ctx.poll(None, None, ALICE)[1]


def test_restarted_app_lists_earlier_runs_to_their_owner_and_resumes_them(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "data" / "gradio"))
    first = make_ctx(tmp_path / "data", assets, TrainingJob(gpus=0, command=fake_command(assets[0])))
    alice = owner_key(None, ALICE)
    name = first.job.start(TrainConfig(data="d", model="nano"), first.paths.runs, alice)
    wait_for(lambda: first.job.snapshot().step == 0 and first.job.snapshot().state == "running")
    assert first.job.stop(alice) and first.job.wait(30)
    # A run whose app died while it trained: recorded as running, its process long gone.
    lost = first.paths.runs / "20200101-000000-nano"
    lost.mkdir()
    (lost / "state").mkdir()
    (lost / "state" / "trainer.json").write_text("{}")
    lost_record = RunRecord(lost.name, alice, TrainConfig(data="d"), state="running", pid=2**22 + 12345, started=1.0)
    write_record(lost, lost_record)

    launched: list = []
    again = make_ctx(tmp_path / "data", assets, TrainingJob(gpus=0, command=fake_command(assets[0], "ok", launched)))
    assert read_record(lost).state == "interrupted" and read_record(lost).resumable
    outputs = again.poll(None, None, ALICE)
    assert list(outputs[12]["run"]) == [name, lost.name]
    assert "Stopped" in outputs[1] and name in outputs[1] and "stopped at step 0" in outputs[4]  # its last state
    assert outputs[13]["choices"] == [name, lost.name]  # both saved a state: both can resume
    assert outputs[14]["interactive"] is True
    assert again.poll(None, None, SimpleNamespace(username=None, session_hash="bob"))[12].empty

    assert again.resume_training(lost.name, None, SimpleNamespace(username=None, session_hash="bob")) != ""
    assert launched == []  # not Bob's run
    again.resume_training(name, None, ALICE)
    assert launched and launched[-1][-1] == "--resume" and launched[-1][2] == str(first.paths.runs / name)
    (first.paths.runs / name / "release").touch()
    assert again.job.wait(30)
    assert again.job.snapshot().state == "done"
    assert json.loads((first.paths.runs / name / "app_run.json").read_text())["state"] == "done"


# --------------------------------------------------------------------------------------------- deployment


def test_binaries_are_stored_with_git_lfs():
    """A Space refuses plain binary files: the bundled model and the example images must go through LFS."""
    paths = ["examples/demo_model/model.safetensors", "examples/images/a.jpg", "x/y.png", "w.onnx", "app.py"]
    output = subprocess.run(
        ["git", "check-attr", "filter", "--", *paths], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    filters = dict(line.rsplit(": filter: ", 1) for line in output.splitlines())
    assert [filters[path] for path in paths] == ["lfs", "lfs", "lfs", "lfs", "unspecified"]


def test_a_busy_port_gives_one_line_naming_the_port_option(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(REPO / "app.py"), "--port", str(port), "--data-dir", str(tmp_path / "data")],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
        )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--port" in lines[0] and str(port) in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "GRADIO_SERVER_PORT" not in result.stderr


def test_reload_mode_finds_a_module_level_demo_and_loads_the_model_once(tmp_path, assets, monkeypatch):
    """`gradio app.py` runs the file, then after each edit runs its source again in the same namespace and serves
    that namespace's `demo`."""
    import tempfile

    import gradio as gr

    import lwdetr.cpu
    from lwdetr_app import models

    for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "MPLCONFIGDIR", "TMPDIR"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # the app sets them: restored after the test
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setenv("LWDETR_APP_DEMO_MODEL", str(assets[0]))
    monkeypatch.setenv("LWDETR_APP_HUB_TIMEOUT", "1")
    monkeypatch.setattr(lwdetr.cpu, "start_background_build", lambda: None)
    launched, loads = [], []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.append(self))
    real_load = models.Detector.__dict__["from_pretrained"].__func__

    def counted_load(cls, ref, **kwargs):
        loads.append(str(ref))
        return real_load(cls, ref, **kwargs)

    monkeypatch.setattr(models.Detector, "from_pretrained", classmethod(counted_load))
    monkeypatch.setattr(sys, "argv", ["app.py", "--data-dir", str(tmp_path / "data"), "--port", "0"])
    code = compile((REPO / "app.py").read_text(), str(REPO / "app.py"), "exec")
    namespace = {"__name__": "__main__", "__file__": str(REPO / "app.py")}
    exec(code, namespace)  # python app.py
    first = namespace["demo"]
    exec(code, namespace)  # the reload after an edit
    assert isinstance(first, gr.Blocks) and isinstance(namespace["demo"], gr.Blocks)
    assert namespace["demo"] is not first and launched == [first, namespace["demo"]]
    assert loads == [str(assets[0].resolve())]  # loaded by the first run only


def test_data_folder_defaults_to_persistent_storage_on_a_space(tmp_path, monkeypatch):
    from lwdetr_app.settings import AppSettings, default_data_dir

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert default_data_dir(tmp_path) == Path("app_data")  # not a Space
    monkeypatch.setenv("SPACE_ID", "someone/lwdetr")
    assert default_data_dir(tmp_path / "missing") == Path("app_data")  # a Space without persistent storage
    assert default_data_dir(tmp_path) == tmp_path / "lwdetr_app"
    monkeypatch.setenv("LWDETR_APP_DATA", str(tmp_path / "mine"))
    assert AppSettings.from_env().data_dir == (tmp_path / "mine").resolve()  # the env still wins


def test_the_ui_says_where_runs_are_kept(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "data" / "gradio"))
    monkeypatch.delenv("SPACE_ID", raising=False)
    note = make_ctx(tmp_path / "data", assets).storage_note()
    assert "lost when it restarts" in note and "20gb" in note and str(tmp_path) not in note
    monkeypatch.setattr("lwdetr_app.handlers.PERSISTENT_STORAGE", tmp_path)
    monkeypatch.setenv("SPACE_ID", "someone/lwdetr")
    assert "survive restarts" in make_ctx(tmp_path / "data", assets).storage_note()
