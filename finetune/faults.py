"""Crash points: the places where a test kills the training process (`kill -9`) to show that a run recovers.

`FINETUNE_CRASH_AT=NAME[:N]` makes the N-th pass (default: the first) of this process through `crash_point(NAME)`
send itself SIGKILL, which no handler can catch: what is on disk then is exactly what a real kill at that moment
leaves. Only tests set the variable; without it a crash point costs one environment lookup.

Names in use: `state-swap` (state/ renamed aside, the new one not yet in place), `state-write` (half of a new
state written), `epoch-saved` (state/ saved, metrics.jsonl, plots and card not yet), `step` (after an optimizer
step).
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "FINETUNE_CRASH_AT"
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process here when `FINETUNE_CRASH_AT` names this point and its pass count is reached."""
    target = os.environ.get(CRASH_ENV)
    if not target:
        return
    wanted, _, count = target.partition(":")
    if wanted != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
