"""Ctrl-C in `recipe finetune` (a real process, a real SIGINT): it says what was left and how to go on, and the run
can be resumed, or started again, in the same folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from finetune_rows import example_rows, rows_with_distinct_starts
from tiny_model import build_tiny_model, write_cpu_finetune_config

from recipe.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("interrupt")
    rows = example_rows()
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(rows[i]) + "\n" for i in rows_with_distinct_starts(rows)) * 6)
    config = write_cpu_finetune_config(folder / "cpu.yaml", num_train_epochs=200.0)
    return build_tiny_model(folder / "tiny"), train, config


def interrupt(command: list[str], out: Path, when) -> tuple[int, str]:
    """Run `command`, send SIGINT once `when(out)` holds, and return its exit code and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "recipe", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not when(out):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.parametrize("checkpointed", [True, False], ids=["after a checkpoint", "before any checkpoint"])
def test_an_interrupted_finetune_says_how_to_go_on_and_resumes_in_place(setup, tmp_path, capsys, checkpointed):
    tiny, train, config = setup
    out = tmp_path / "run"
    command = ["finetune", "--config", str(config), "--data", str(train), "--model", str(tiny), "-o", str(out)]

    def ready(folder: Path) -> bool:
        if checkpointed:
            return any((folder / "checkpoints").glob("checkpoint-*/trainer_state.json"))
        return (folder / ".run_in_progress").exists()

    code, err = interrupt(command, out, ready)
    assert code == 130 and "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert "--resume" in message
    assert ("checkpoint-" in message) if checkpointed else ("no checkpoint was saved yet" in message)
    # The same command without --resume names the way on; with --resume (fewer epochs, to finish fast) it goes on.
    assert main(command) == 2
    refusal = capsys.readouterr().err.strip()
    assert "holds an interrupted run" in refusal and "--resume" in refusal
    assert main([*command, "--resume", "--epochs", "2"]) == 0
    assert (out / "adapter_config.json").is_file() and not (out / ".run_in_progress").exists()
