"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose answers and faults a test scripts.

The server speaks enough of the OpenAI API (`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
and `POST /v1/embeddings` with deterministic bag-of-words vectors, see `hashing_embedding`) for the real `openai`
client to parse its answers, so tests and benchmarks exercise the client's whole HTTP path:
timeouts, status codes, headers, broken bodies and dropped connections. Paths are matched by suffix, so Azure-style
URLs (`/openai/deployments/<name>/chat/completions?api-version=...`) work too.

    with ScriptedOpenAIServer(FaultSchedule("start flow transfer_money")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        assert server.hits() == 1

It uses only the standard library (`http.server.ThreadingHTTPServer` in a background thread) and records every
request, thread-safely, so tests can count hits in total and per prompt.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import math
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast

Endpoint = Literal["chat", "completions", "models", "embeddings"]
EMBEDDING_DIMENSIONS = 64  # of `/v1/embeddings` answers, unless the request asks for `dimensions`


def hashing_embedding(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The server's embedding of `text`: each lower-cased word adds 1 at the index its sha256 picks, then the
    vector is scaled to length 1 (all zeros for a text without words). Tests compute it to predict similarities."""
    vector = [0.0] * dimensions
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big") % dimensions] += 1.0
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


@dataclass(frozen=True)
class Reply:
    """What the server does with one request: answer with text, or misbehave in a scripted way."""

    status: int = 200
    content: str = ""  # the answer text of a 200 (`Reply.text(...)` builds one)
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_message: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0
    malformed_body: bool = False
    drop_connection: bool = False

    @classmethod
    def text(
        cls,
        text: str,
        *,
        finish_reason: str = "stop",
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> Reply:
        return cls(
            content=text, finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )

    @classmethod
    def error(
        cls,
        status: int,
        *,
        message: str | None = None,
        retry_after: float | None = None,
        retry_after_ms: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """An HTTP error with an OpenAI-shaped error body, optionally with Retry-After headers."""
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = _format_number(retry_after)
        if retry_after_ms is not None:
            all_headers["retry-after-ms"] = _format_number(retry_after_ms)
        return cls(
            status=status, error_message=message or f"scripted error {status}", headers=tuple(all_headers.items())
        )

    @classmethod
    def delay(cls, seconds: float, *, then: Reply | str) -> Reply:
        """Wait `seconds` before doing `then` (a client with a shorter timeout gives up first)."""
        reply = _as_reply(then)
        return dataclasses.replace(reply, delay_s=reply.delay_s + seconds)

    @classmethod
    def malformed(cls) -> Reply:
        """A 200 whose body claims to be JSON but is cut off mid-document."""
        return cls(malformed_body=True)

    @classmethod
    def disconnect(cls) -> Reply:
        """Read the request, then close the connection without any response."""
        return cls(drop_connection=True)


Responder = Callable[[dict[str, Any]], Reply | str]


@dataclass(frozen=True)
class RecordedRequest:
    endpoint: Endpoint
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    prompt: str | None


def prompt_of(body: Mapping[str, Any]) -> str | None:
    """The text a request is about: the last user message (chat) or the prompt (completions)."""
    if isinstance(body.get("messages"), list):
        for message in reversed(body["messages"]):
            if isinstance(message, dict) and message.get("role") == "user":
                return _content_text(message.get("content"))
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else None
    return prompt if isinstance(prompt, str) else None


def echo_answer(request: dict[str, Any]) -> Reply:
    return Reply.text(f"echo: {prompt_of(request)}")


class FaultSchedule:
    """A responder that plays scripted replies per prompt first, then answers normally.

        schedule = FaultSchedule("start flow transfer_money")
        schedule.fail_first(2, Reply.error(429, retry_after=1), prompt="send 40 to Mia")

    Replies scripted for a specific prompt are used before those scripted for any prompt (`prompt=None`).
    """

    def __init__(self, answer: Responder | str | None = None):
        self._answer = answer
        self._scripted: dict[str | None, deque[Reply]] = {}
        self._lock = threading.Lock()

    def fail_first(self, count: int, reply: Reply, *, prompt: str | None = None) -> FaultSchedule:
        """The next `count` hits for `prompt` (any prompt when None) get `reply`."""
        return self.script(*([reply] * count), prompt=prompt)

    def script(self, *replies: Reply | str, prompt: str | None = None) -> FaultSchedule:
        """The next hits for `prompt` get `replies`, in order."""
        with self._lock:
            self._scripted.setdefault(prompt, deque()).extend(_as_reply(reply) for reply in replies)
        return self

    def __call__(self, request: dict[str, Any]) -> Reply:
        prompt = prompt_of(request)
        with self._lock:
            for key in (prompt, None):
                queue = self._scripted.get(key)
                if queue:
                    return queue.popleft()
        if self._answer is None:
            return echo_answer(request)
        if isinstance(self._answer, str):
            return Reply.text(self._answer)
        return _as_reply(self._answer(request))


class ScriptedOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 (ephemeral port) in a background thread; use it as a context manager.

    `latency_s` is added to every POST (for concurrency benchmarks); `reject_response_format=True` answers 400 to any
    request carrying `response_format`, like an endpoint without JSON mode. With `api_key` set, a request carrying
    another bearer key gets OpenAI's 401 (whose message echoes the key, masked); with `only_model=True`, a POST or
    `GET /models/<id>` naming another model than `model` gets OpenAI's 404 `model_not_found`.
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency_s: float = 0.0,
        reject_response_format: bool = False,
        model: str = "scripted-model",
        api_key: str | None = None,
        only_model: bool = False,
    ):
        self._responder: Responder = responder or echo_answer
        self.api_key = api_key
        self.only_model = only_model
        self.latency_s = latency_s
        self.reject_response_format = reject_response_format
        self.model = model
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._responder_errors: list[str] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> ScriptedOpenAIServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, owner=self)
        # A short poll interval makes stop() quick (serve_forever checks for shutdown once per interval).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="scripted-openai-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers that are sleeping through a scripted delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT/v1`, what an OpenAI client takes as `base_url`."""
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """`http://127.0.0.1:PORT`, what an Azure client takes as `azure_endpoint`."""
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{cast(str, host)}:{port}"  # an AF_INET server's host is a str, never bytes

    # -- what happened ---------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def hits(self, prompt: str | None = None, *, endpoint: Endpoint | None = None) -> int:
        """POST requests received, in total, for one prompt (see `prompt_of`) and/or to one endpoint."""
        return sum(
            1
            for request in self.requests
            if request.endpoint != "models"
            and (prompt is None or request.prompt == prompt)
            and (endpoint is None or request.endpoint == endpoint)
        )

    @property
    def max_in_flight(self) -> int:
        """The most POST requests the server was handling at the same moment."""
        with self._lock:
            return self._max_in_flight

    @property
    def responder_errors(self) -> list[str]:
        """Exceptions raised by the responder (answered as 500, so a buggy test script shows up here)."""
        with self._lock:
            return list(self._responder_errors)

    # -- called by the handler threads -----------------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @contextmanager
    def _counting_in_flight(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def _reply_for(self, body: dict[str, Any]) -> Reply:
        if self.reject_response_format and body.get("response_format") is not None:
            return Reply.error(400, message="response_format (JSON mode) is not supported by this endpoint")
        try:
            return _as_reply(self._responder(body))
        except Exception as error:  # a bug in the test's script: answer 500 and keep it for the test to see
            with self._lock:
                self._responder_errors.append(f"{type(error).__name__}: {error}")
            return Reply.error(500, message=f"responder failed: {error}")

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops first; True when the sleep completed."""
        return seconds <= 0 or not self._stopping.wait(seconds)

    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops connections under benchmark concurrency

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, owner: ScriptedOpenAIServer):
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that hung up (timed out, was cancelled or killed) is part of what tests script
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real endpoints
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle plus the client's delayed ACK add ~40 ms
    # to every answer, which would swamp the latencies the benchmarks measure.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _refused(self, model: object) -> bool:
        """Answer 401/404 as OpenAI does for a wrong key or an unknown model; True when answered."""
        owner = self.server.owner
        if owner.api_key is not None:
            given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if given != owner.api_key:
                masked = given[:8] + "*" * max(len(given) - 12, 0) + given[-4:]
                message = (
                    f"Incorrect API key provided: {masked}. You can find your API key at "
                    f"https://platform.openai.com/account/api-keys. (sent: {given})"
                )
                self._send_json(
                    401,
                    {
                        "error": {
                            "message": message,
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                )
                return True
        if owner.only_model and model is not None and model != owner.model:
            self._send_json(
                404,
                {
                    "error": {
                        "message": f"The model `{model}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "model_not_found",
                    }
                },
            )
            return True
        return False

    def do_GET(self) -> None:
        owner = self.server.owner
        if self._refused(None):
            return
        if _endpoint_of(self.path) != "models":
            self._send_json(404, _error_body(f"no route for GET {self.path}", 404))
            return
        owner._record(RecordedRequest("models", self.path, {}, dict(self.headers), None))
        self._send_json(
            200,
            {
                "object": "list",
                "data": [{"id": owner.model, "object": "model", "created": 0, "owned_by": "recipe-tests"}],
            },
        )

    def do_POST(self) -> None:
        owner = self.server.owner
        endpoint = _endpoint_of(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if endpoint not in ("chat", "completions", "embeddings"):
            self._send_json(404, _error_body(f"no route for POST {self.path}", 404))
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send_json(400, _error_body("request body is not JSON", 400))
            return
        if self._refused(body.get("model") if isinstance(body, dict) else None):
            return
        with owner._counting_in_flight():
            owner._record(RecordedRequest(endpoint, self.path, body, dict(self.headers), prompt_of(body)))
            reply = owner._reply_for(body)
            if not owner._sleep(owner.latency_s + reply.delay_s):
                self.close_connection = True
                return
            try:
                self._send_reply(reply, endpoint, body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) before we answered
                self.close_connection = True

    def _send_reply(self, reply: Reply, endpoint: Endpoint, body: dict[str, Any]) -> None:
        if reply.drop_connection:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if reply.malformed_body:
            self._send_bytes(200, b'{"id": "broken", "object": "chat.completion", "choices": [{"ind', ())
            return
        if reply.status != 200:
            self._send_json(reply.status, _error_body(reply.error_message or "error", reply.status), reply.headers)
            return
        if endpoint == "embeddings":  # the reply's text is not used: vectors follow from the input
            self._send_json(200, _embeddings_body(body), reply.headers)
            return
        self._send_json(200, self._answer_body(reply, endpoint, body), reply.headers)

    def _answer_body(self, reply: Reply, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        owner = self.server.owner
        prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else _word_count(prompt_of(body))
        completion_tokens = (
            reply.completion_tokens if reply.completion_tokens is not None else _word_count(reply.content)
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        number = owner._next_id()
        model = body.get("model") or owner.model
        if endpoint == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": reply.finish_reason,
                "logprobs": None,
            }
            return {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        choice = {"index": 0, "text": reply.content, "finish_reason": reply.finish_reason, "logprobs": None}
        return {
            "id": f"cmpl-{number}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    def _send_json(self, status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), headers)

    def _send_bytes(self, status: int, data: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _embeddings_body(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else [str(text) for text in inputs or []]
    requested = body.get("dimensions")
    dimensions = requested if isinstance(requested, int) else EMBEDDING_DIMENSIONS
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vector: Any = hashing_embedding(text, dimensions)
        if body.get("encoding_format") == "base64":  # what the openai client asks for unless told otherwise
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(_word_count(text) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model") or "scripted-model",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _endpoint_of(path: str) -> Endpoint | None:
    route = path.split("?", 1)[0].rstrip("/")
    if route.endswith("/embeddings"):
        return "embeddings"
    if route.endswith("/chat/completions"):
        return "chat"
    if route.endswith("/completions"):
        return "completions"
    if route.endswith("/models"):
        return "models"
    return None


def _error_body(message: str, status: int) -> dict[str, Any]:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


def _as_reply(reply: Reply | str) -> Reply:
    return Reply.text(reply) if isinstance(reply, str) else reply


def _content_text(content: object) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return None


def _word_count(text: str | None) -> int:
    return len(text.split()) if text else 0


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
