"""A stand-in for `python -m finetune` in the app's job tests: the same run-folder contract, in a fraction of a second.

    python fake_trainer.py RUN_DIR MODEL_DIR MODE [--resume]

Writes events.jsonl as `finetune.callbacks.EventLog` does: a start event, then 4 steps, each waiting for the file
RUN_DIR/release (or SIGTERM, which saves last/ and state/ and ends with a "stopped" event, as finetune does), then
an evaluated epoch with best/ and a "done" event; before its last event it writes result.json as finetune does
(`finetune.result.write_result`). MODE `fail` prints finetune's one-line error and exits 2; MODE `hang` waits after
the first step until it is killed; MODE `worse` evaluates a second epoch, worse than the first (last/ only).
"""

import json
import shutil
import signal
import sys
import time
from pathlib import Path

from finetune.result import TrainResult, eval_metrics, offered_model_dir, write_result

run_dir, model_dir, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))


def event(kind, step, metrics=None, message="", eta=None):
    record = {"kind": kind, "step": step, "total_steps": 4, "epoch": 1, "epochs": 1, "metrics": metrics or {},
              "message": message, "eta_seconds": eta, "time": time.time()}  # fmt: skip
    with open(run_dir / "events.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def save(folder):
    shutil.copytree(model_dir, run_dir / folder, dirs_exist_ok=True)
    (run_dir / "state").mkdir(exist_ok=True)
    (run_dir / "state" / "trainer.json").write_text(json.dumps({"step": 1}))


def result(step, history, stopped=False):
    best = max(history, key=lambda row: row["AP"], default=None)
    write_result(
        TrainResult(
            output_dir=run_dir, best_dir=run_dir / "best" if best else None, last_dir=run_dir / "last",
            best_ap=best["AP"] if best else None, best_epoch=best["epoch"] if best else None,
            epochs_completed=len(history), step=step, total_steps=4, stopped=stopped,
            metrics=eval_metrics(history[-1]) if history else {}, history=history, model_dir=offered_model_dir(run_dir),
        )
    )  # fmt: skip


if mode == "fail":
    print(f"error: image size 100 does not fit this model (data in {run_dir})", file=sys.stderr)
    sys.exit(2)
event("start", 0, message="resuming at step 1" if "--resume" in sys.argv else "starting: 4 steps")
for step in range(1, 5):
    while not ((run_dir / "release").exists() or stop):
        time.sleep(0.01)
    if stop:
        save("last")
        result(step - 1, [], stopped=True)
        event("stopped", step - 1, message=f"stopped at step {step - 1}; resume with --resume")
        sys.exit(0)
    event("step", step, {"loss": 10.0 - step, "lr": 1e-4}, eta=40.0 - 10 * step)
    if mode == "hang":
        while True:
            time.sleep(1)
metrics = {"loss": 7.5, "AP": 0.5, "AP50": 0.8, "AP75": 0.4, "AP/circle": 0.6}
history = [{"epoch": 1, "step": 4, **metrics}]
save("best")
save("last")
event("epoch", 4, metrics, "epoch 1/1: loss 7.500, AP 0.500 AP50 0.800")
if mode == "worse":
    metrics = {"loss": 7.0, "AP": 0.3, "AP50": 0.6, "AP75": 0.2, "AP/circle": 0.4}
    history.append({"epoch": 2, "step": 4, **metrics})
    event("epoch", 4, metrics, "epoch 2/2: loss 7.000, AP 0.300 AP50 0.600")
result(4, history)
event("done", 4, metrics, "done: 1 epochs, 4 steps, best AP 0.500 at epoch 1")
