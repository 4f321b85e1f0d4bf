"""A real rasa-sdk action server on 127.0.0.1 for tests, in rasa-sdk's own virtual environment.

rasa-sdk pins its dependencies tightly (sanic, grpc, opentelemetry, pydantic<2.14, multidict<7, ...), so it lives in
a virtual environment of its own, built once from the package index into the git-ignored `.cache/` folder of the
repository and reused by later runs (about 20 s to build, nothing to reuse). The server runs `actions.py` beside this
file, as `python -m rasa_sdk --actions actions --port PORT`, bound to 127.0.0.1 (`SANIC_HOST`; rasa-sdk has no host
flag), and is killed with its worker processes when the context ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

RASA_SDK_VERSION = "3.21.1"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENV = ROOT / ".cache" / f"rasa-sdk-{RASA_SDK_VERSION}"


class HarnessError(RuntimeError):
    """The action server could not be provided; the message says why and what to do."""


def rasa_sdk_python(venv: Path = VENV) -> Path:
    """The interpreter of a virtual environment with rasa-sdk installed: reused when complete, else built (in a
    side folder renamed into place at the end, so an interrupted build is never taken for a complete one)."""
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file() and python.exists():
        return python
    build = venv.with_name(f"{venv.name}.build-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(build)], check=True, capture_output=True, timeout=120)
    command = [
        str(build / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "-q",
        f"rasa-sdk=={RASA_SDK_VERSION}",
    ]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        shutil.rmtree(build, ignore_errors=True)
        raise HarnessError(
            f"installing rasa-sdk=={RASA_SDK_VERSION} took over 10 minutes; is the package index reachable?"
        ) from None
    if result.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        tail = "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)[-2000:]
        raise HarnessError(
            f"cannot build rasa-sdk's virtual environment ({' '.join(command[2:])} exited "
            f"{result.returncode}); the action-server tests need the package index:\n{tail}"
        )
    (build / ".complete").write_text(f"rasa-sdk=={RASA_SDK_VERSION}\n", encoding="utf-8")
    shutil.rmtree(venv, ignore_errors=True)
    build.rename(venv)  # `python -m ...` works from a moved venv: it finds its site-packages beside bin/
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningActionServer:
    url: str  # the webhook
    port: int
    log: Path  # one JSON line per action run (see actions.py)
    state: Path  # folder for the flaky actions' state
    output: Path  # the server's stdout and stderr

    def calls(self) -> list[dict[str, Any]]:
        """Every action run so far, in order, with what the action saw."""
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def running_action_server(
    python: Path, workdir: Path, startup_timeout_s: float = 60.0
) -> Iterator[RunningActionServer]:
    """Start the test actions on a free port of 127.0.0.1, wait for `/health`, and kill the server at the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RunningActionServer(
        url=f"http://127.0.0.1:{port}/webhook",
        port=port,
        log=workdir / "calls.jsonl",
        state=workdir / "state",
        output=workdir / "server.log",
    )
    server.state.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        SANIC_HOST="127.0.0.1",
        PYTHONDONTWRITEBYTECODE="1",
        RECIPE_TEST_ACTIONS_LOG=str(server.log),
        RECIPE_TEST_ACTIONS_STATE=str(server.state),
    )
    with open(server.output, "wb") as output:
        process = subprocess.Popen(
            [str(python), "-m", "rasa_sdk", "--actions", "actions", "--port", str(port)],
            cwd=HERE,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise HarnessError(
                    f"the action server exited with {process.returncode}:\n"
                    + server.output.read_text(errors="replace")[-3000:]
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"the action server did not answer /health within {startup_timeout_s:g}s:\n"
                    + server.output.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.1)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Sanic runs a main process and a worker: end the whole process group the server was started in."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)  # the group outlives the main process while a worker is left
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
