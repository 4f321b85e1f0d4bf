"""Real HTTP servers on 127.0.0.1 that speak Anthropic's messages API and AWS Bedrock's Converse API.

Tests point recipe's LLM client at them (`api_base`) to exercise the whole HTTP path of those providers: the
request bodies and headers, the answer shapes, status codes and `retry-after`. Each server records every request
(path, headers, JSON body); `answer` maps a request body to a `Reply` (see recipe.testing.openai_server).

    with NativeLLMServer("anthropic", lambda body: Reply.text("start flow x")) as server:
        config = LLMConfig(provider="anthropic", model="claude-x", api_base=server.root_url)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from recipe.testing.openai_server import Reply

Dialect = Literal["anthropic", "bedrock"]


@dataclass(frozen=True)
class NativeRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    raw: bytes


class NativeLLMServer:
    def __init__(self, dialect: Dialect, answer: Callable[[dict[str, Any]], Reply | str], models: Sequence[str] = ()):
        self.dialect = dialect
        self.answer = answer
        self.models = list(models)
        self._requests: list[NativeRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def root_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[NativeRequest]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> NativeLLMServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._record(self, b"")
                if owner.dialect == "anthropic" and self.path.rstrip("/").endswith("/v1/models"):
                    self._json(200, {"data": [{"id": name, "type": "model"} for name in owner.models]})
                else:
                    self._json(404, {"message": "not found"})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                body = owner._record(self, raw)
                reply = owner.answer(body or {})
                reply = Reply.text(reply) if isinstance(reply, str) else reply
                headers = dict(reply.headers)
                if reply.status != 200:
                    message = reply.error_message or f"error {reply.status}"
                    error = (
                        {"type": "error", "error": {"type": "api_error", "message": message}}
                        if owner.dialect == "anthropic"
                        else {"message": message}
                    )
                    self._json(reply.status, error, headers)
                    return
                prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else 11
                completion_tokens = reply.completion_tokens if reply.completion_tokens is not None else 3
                cut = reply.finish_reason == "length"
                if owner.dialect == "anthropic":
                    payload = {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": (body or {}).get("model"),
                        "content": [{"type": "text", "text": reply.content}],
                        "stop_reason": "max_tokens" if cut else "end_turn",
                        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
                    }
                else:
                    payload = {
                        "output": {"message": {"role": "assistant", "content": [{"text": reply.content}]}},
                        "stopReason": "max_tokens" if cut else "end_turn",
                        "usage": {
                            "inputTokens": prompt_tokens,
                            "outputTokens": completion_tokens,
                            "totalTokens": prompt_tokens + completion_tokens,
                        },
                    }
                self._json(200, payload, headers)

            def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def _record(self, handler: BaseHTTPRequestHandler, raw: bytes) -> dict[str, Any] | None:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = NativeRequest(
            handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}, body, raw
        )
        with self._lock:
            self._requests.append(request)
        return body
