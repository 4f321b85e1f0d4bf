"""`recipe serve` under hostile clients: a real server process on 127.0.0.1 serving the tiny finetuned model, driven
with raw sockets (chunked uploads past the limit, slow headers and bodies, dropped uploads, absurdly deep JSON).
Bounded in count and time; the server's memory is read from /proc."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rt_artifacts import finetuned_folder

from recipe.prompt import PROMPTS_DIR, load_template

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")

MAX_BODY = 1_000_000
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 1.0, 2.0
SERVER = """
import logging, sys
from pathlib import Path
from recipe.backends import LocalModelBackend
from recipe.serve import ModelServer, ServeLimits, create_app, serve_forever
logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s: %(message)s")
limits = ServeLimits(max_request_bytes={max_body}, header_timeout_s={header}, body_timeout_s={body})
backend = LocalModelBackend(Path(sys.argv[1]), max_new_tokens=4, threads=1)
serve_forever(create_app(ModelServer(backend, "tiny", limits)), "127.0.0.1", int(sys.argv[2]))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def headers(self, extra: str) -> bytes:
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}\r\n"
        ).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve_limits")
    model = finetuned_folder(directory, load_template(PROMPTS_DIR / "command_prompt_v2.jinja2"))
    port, log = free_port(), directory / "server.log"
    script = SERVER.format(max_body=MAX_BODY, header=HEADER_TIMEOUT_S, body=BODY_TIMEOUT_S)
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(model), str(port)], stderr=stderr, stdout=subprocess.DEVNULL
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    yield Server(process, port, log)
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


def status_of(connection: socket.socket) -> int | None:
    """The status code the server answered, None when it closed without an answer."""
    received = b""
    try:
        while b"\r\n" not in received:
            chunk = connection.recv(4096)
            if not chunk:
                break
            received += chunk
    except (TimeoutError, ConnectionError):
        pass
    return int(received.split()[1]) if received.startswith(b"HTTP/1.1") else None


def chunked_upload(server: Server, total_bytes: int, results: list) -> None:
    connection = server.connect()
    sent = 0
    piece = b"x" * 1_000_000
    try:
        connection.sendall(server.headers("Transfer-Encoding: chunked\r\n"))
        start = b'{"messages": [{"role": "user", "content": "'
        connection.sendall(f"{len(start):x}\r\n".encode() + start + b"\r\n")
        while sent < total_bytes:
            connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
        connection.sendall(b"0\r\n\r\n")
    except (TimeoutError, ConnectionError):
        pass  # the server stopped reading: what we want
    results.append((status_of(connection), sent))
    connection.close()


def test_chunked_uploads_past_the_limit_are_refused_while_reading_and_memory_stays_bounded(server):
    baseline = rss_kib(server.process.pid)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(server.process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: list = []
    uploads = [threading.Thread(target=chunked_upload, args=(server, 50_000_000, results)) for _ in range(4)]
    for upload in uploads:
        upload.start()
    for upload in uploads:
        upload.join(timeout=60)
    done.set()
    sampler.join()
    assert [status for status, _ in results] == [413] * 4
    growth_mb = (peak[0] - baseline) / 1024
    print(f"4 parallel 50 MB chunked uploads: server RSS {baseline / 1024:.0f} MB -> peak {peak[0] / 1024:.0f} MB")
    assert growth_mb < 40, f"the server grew by {growth_mb:.0f} MB"


def test_slow_headers_and_bodies_are_cut_off(server):
    slow_headers = [server.connect() for _ in range(100)]
    for connection in slow_headers:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    slow_bodies = [server.connect() for _ in range(20)]
    for connection in slow_bodies:
        connection.sendall(server.headers("Content-Length: 1000\r\n") + b'{"messages": ')
    started = time.monotonic()
    assert all(status_of(connection) is None for connection in slow_headers)  # closed, unanswered
    assert [status_of(connection) for connection in slow_bodies] == [408] * 20
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    for connection in slow_headers + slow_bodies:
        connection.close()


def test_unusable_json_is_400_and_dropped_uploads_log_one_line_each(server):
    deep = b"[" * 200_000 + b"]" * 200_000
    connection = server.connect()
    connection.sendall(server.headers(f"Content-Length: {len(deep)}\r\n") + deep)
    assert status_of(connection) == 400
    connection.close()
    lines_before = len(server.log.read_text().splitlines())
    for _ in range(20):
        connection = server.connect()
        connection.sendall(server.headers("Content-Length: 500000\r\n") + b"x" * 100_000)
        time.sleep(0.05)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        connection.close()  # a reset, mid-body
    time.sleep(1.0)
    log = server.log.read_text()
    new_lines = log.splitlines()[lines_before:]
    assert "Traceback" not in log
    assert 1 <= len(new_lines) <= 20 and all("hung up" in line for line in new_lines), new_lines
    # And the server still answers.
    connection = server.connect()
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    connection.sendall(server.headers(f"Content-Length: {len(body)}\r\n") + body)
    assert status_of(connection) == 200
    connection.close()
