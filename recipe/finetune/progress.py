"""What a training run prints: one concise line per logging step with an ETA, progress bars only on a terminal.

The trainer's own printer writes every log entry as a Python dict and its bars redraw into log files; both are
replaced here. Imports transformers: import this module only once a run is starting.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

log = logging.getLogger("recipe.finetune")


def on_a_terminal() -> bool:
    return sys.stderr.isatty()


def duration_text(seconds: float) -> str:
    """`6 h 40 min`, `3 min 10 s`, `42 s`."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


class _BarWithoutDicts(ProgressCallback):
    """The trainer's bar, without the dict it writes under the bar at every log (our line says it once)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None


class LogLineCallback(TrainerCallback):
    """One line per logging step (`step 5/244 epoch 0.08: loss 4.3105, lr 2.0e-02, ETA 3 min 10 s`), one per val
    evaluation, and, when `slow_reason` is set, a warning with the measured ETA after the first step."""

    def __init__(self, slow_reason: str | None = None):
        self.slow_reason = slow_reason
        self._started: float | None = None
        self._first_step = 0
        self._warned = False

    def eta_s(self, state: Any) -> float | None:
        done = state.global_step - self._first_step
        if self._started is None or done <= 0 or not state.max_steps:
            return None
        return (time.monotonic() - self._started) / done * (state.max_steps - state.global_step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.monotonic()
        self._first_step = state.global_step  # a resumed run starts later

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.slow_reason and not self._warned and state.is_world_process_zero:
            eta = self.eta_s(state)
            if eta is not None:
                self._warned = True
                log.warning(
                    "%s: this run will take about %s more (%d steps). For a first try on a CPU use "
                    "`recipe finetune --smoke`; on a GPU the same run takes minutes",
                    self.slow_reason,
                    duration_text(eta),
                    state.max_steps - state.global_step,
                )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        line = log_line(logs, state.global_step, state.max_steps, self.eta_s(state))
        if line:
            log.info(line)


def log_line(logs: dict[str, Any], step: int, max_steps: int, eta_s: float | None) -> str | None:
    """The one line for a trainer log entry (train step, val evaluation or the end-of-run summary)."""
    epoch = logs.get("epoch")
    where = f"step {step}/{max_steps}" + (f" epoch {epoch:.2f}" if isinstance(epoch, (int, float)) else "")
    if "eval_loss" in logs:
        runtime = logs.get("eval_runtime")
        return f"{where}: val loss {logs['eval_loss']:.4f}" + (f" ({runtime:.0f} s)" if runtime is not None else "")
    if "train_loss" in logs:
        runtime = logs.get("train_runtime")
        return f"{where}: training done, run mean loss {logs['train_loss']:.4f}" + (
            f" in {duration_text(runtime)}" if runtime is not None else ""
        )
    if "loss" in logs:
        parts = [f"loss {logs['loss']:.4f}"]
        if logs.get("learning_rate") is not None:
            parts.append(f"lr {logs['learning_rate']:.1e}")
        if logs.get("grad_norm") is not None:
            parts.append(f"grad norm {logs['grad_norm']:.3g}")
        if eta_s is not None and step < max_steps:
            parts.append(f"ETA {duration_text(eta_s)}")
        return f"{where}: " + ", ".join(parts)
    return None


def quiet_trainer_output(trainer: Any, line_callback: LogLineCallback) -> None:
    """Our line instead of the trainer's dicts; a bar only where a person watches a terminal."""
    trainer.remove_callback(PrinterCallback)
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    if had_bar and on_a_terminal():
        trainer.add_callback(_BarWithoutDicts)
    trainer.add_callback(line_callback)


def quiet_library_bars() -> None:
    """Loading and saving bars of transformers and datasets only on a terminal."""
    if on_a_terminal():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
