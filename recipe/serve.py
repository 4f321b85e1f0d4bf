"""`recipe serve`: an OpenAI-compatible server for a finetuned command generator, for CPUs and small GPUs.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`. It binds 127.0.0.1
unless told otherwise, checks an optional bearer key, bounds request size, prompt tokens and answer tokens, queues
concurrent requests (one generation at a time per model; a full queue answers 503) and answers every error in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), so clients such as Rasa Pro or the `openai`
package report them properly. With a project it can constrain every answer to the assistant's command grammar.

For production throughput use vLLM (`vllm_serve_command` builds its command line from a `recipe finetune` folder).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (`Request`, imported lazily inside
# `create_app` so the module imports without the [serve] extra) as real objects.
import asyncio
import hmac
import json
import logging
import math
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from recipe.artifacts import MERGED_DIR, read_training_info
from recipe.backends import LocalModelBackend
from recipe.commands import Syntax
from recipe.errors import ConfigError
from recipe.grammar import CommandGrammar, build_grammar, grammar_from_regex
from recipe.llm import is_loopback, key_from_named_variable
from recipe.project import Project

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks `--max-lora-rank` accepts


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for. Oversized requests get 413, over-long prompts and answers 400, a full queue 503."""

    max_request_bytes: int = 1_000_000
    max_prompt_tokens: int = 8192
    max_tokens: int = 512  # the most answer tokens a request may ask for
    default_max_tokens: int = 256  # when a request names none (Rasa Pro's examples send 256)
    max_pending: int = 32  # requests waiting or running; more are refused with 503 and Retry-After
    # A client must send its request line and headers within header_timeout_s of connecting (else the connection is
    # closed) and its whole body within body_timeout_s (else 408): slow clients cannot hold connections open.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256  # open connections; more are answered 503 by the HTTP server

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_prompt_tokens",
            "max_tokens",
            "default_max_tokens",
            "max_pending",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be a positive number of seconds, got {getattr(self, name)}"
                )
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"default max tokens {self.default_max_tokens} exceeds the limit {self.max_tokens}")


class ApiError(Exception):
    """An error answered to the client: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion request."""

    input_ids: list[int]
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    grammar: CommandGrammar | None


class ModelServer:
    """The request logic behind the routes, independent of the web framework."""

    def __init__(
        self,
        backend: LocalModelBackend,
        model_name: str,
        limits: ServeLimits,
        project: Project | None = None,
        syntax: Syntax | None = None,
        always_constrain: bool = False,
        api_key: str | None = None,
    ):
        if always_constrain and project is None:
            raise ConfigError("constraining every answer needs the assistant's grammar: pass --project")
        self.backend = backend
        self.model_name = model_name
        self.limits = limits
        self.project = project
        self.grammar = build_grammar(project, syntax or Syntax.V2) if project is not None else None
        self._grammars: dict[str, CommandGrammar] = {self.grammar.regex: self.grammar} if self.grammar else {}
        self.always_constrain = always_constrain
        self.api_key = api_key
        self.created = int(time.time())
        self._pending = 0
        self._pending_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ checks

    def check_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "invalid or missing API key (send Authorization: Bearer <key>)",
                type="authentication_error",
                code="invalid_api_key",
            )

    def parse_body(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > self.limits.max_request_bytes:
            raise ApiError(
                413,
                f"request body has {len(raw)} bytes, the limit is {self.limits.max_request_bytes}",
                code="request_too_large",
            )
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"request body is not valid JSON: {error}") from None
        except RecursionError:
            raise ApiError(400, "request body is not usable JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def _check_request(self, body: dict[str, Any]) -> None:
        self._check_model(body)
        if body.get("stream"):
            raise ApiError(400, "stream is not supported; send stream: false", param="stream")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")

    def _request(self, body: dict[str, Any], input_ids: list[int]) -> GenerationRequest:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.limits.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
        if max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} exceeds this server's limit of {self.limits.max_tokens}",
                param="max_tokens",
            )
        temperature = body.get("temperature", 0.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise ApiError(
                400, f"temperature must be a number between 0 and 2, got {temperature!r}", param="temperature"
            )
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        if len(input_ids) > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(input_ids)} tokens, this server's limit is {self.limits.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )
        return GenerationRequest(input_ids, max_tokens, float(temperature), tuple(stop), self._grammar(body))

    def _grammar(self, body: dict[str, Any]) -> CommandGrammar | None:
        """The grammar a request asks for (vLLM's `structured_outputs`), or the server's own when it constrains all."""
        asked = body.get("structured_outputs")
        for legacy in ("guided_regex", "guided_grammar", "guided_json", "guided_choice", "response_format"):
            if body.get(legacy) not in (None, {"type": "text"}):
                raise ApiError(
                    400,
                    f"{legacy} is not supported; this server constrains answers to the assistant's "
                    "command grammar only (structured_outputs with its regex)",
                    param=legacy,
                )
        if asked is None:
            return self.grammar if self.always_constrain else None
        regex = asked.get("regex") if isinstance(asked, dict) and len(asked) == 1 else None
        grammar = self._known_grammar(regex) if isinstance(regex, str) else None
        if grammar is None:
            raise ApiError(
                400,
                'structured_outputs: this server supports only {"regex": ...} with a command grammar '
                "of the project it was started with (recipe serve --project DIR)",
                param="structured_outputs",
            )
        return grammar

    def _known_grammar(self, regex: str) -> CommandGrammar | None:
        # Grammars differ by the flows startable in the caller's dialogue state; each is rebuilt once and kept, so
        # its token masks are reused.
        if self.grammar is None:
            return None
        if regex not in self._grammars:
            found = grammar_from_regex(self.project, self.grammar.syntax, regex) if self.project else None
            if found is None:
                return None
            self._grammars[regex] = found
        return self._grammars[regex]

    def chat_request(self, body: dict[str, Any]) -> GenerationRequest:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        for message in messages:
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise ApiError(400, "each message needs a string role and a string content", param="messages")
        self._check_request(body)  # before the (slow) tokenization
        return self._request(body, self.backend.encode_messages(messages))

    def completion_request(self, body: dict[str, Any]) -> GenerationRequest:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
        self._check_request(body)
        return self._request(body, self.backend.encode_text(prompt))

    # ------------------------------------------------------------------------------------------ running

    @contextmanager
    def slot(self) -> Iterator[None]:
        """A place in the queue, or 503 when `max_pending` requests are already waiting or running."""
        with self._pending_lock:
            if self._pending >= self.limits.max_pending:
                raise ApiError(
                    503,
                    f"server busy: {self._pending} requests pending; retry shortly",
                    type="server_error",
                    code="overloaded",
                )
            self._pending += 1
        try:
            yield
        finally:
            with self._pending_lock:
                self._pending -= 1

    def generate(self, request: GenerationRequest) -> tuple[str, int, int, str]:
        completion = self.backend.generate(
            request.input_ids,
            max_new_tokens=request.max_tokens,
            temperature=request.temperature,
            stop=request.stop,
            grammar=request.grammar,
        )
        return completion.text, completion.prompt_tokens, completion.completion_tokens, completion.finish_reason

    def response(self, kind: str, text: str, prompt_tokens: int, completion_tokens: int, finish: str) -> dict[str, Any]:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [choice],
                "usage": usage,
            }
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": usage,
        }

    def models(self) -> dict[str, Any]:
        entry = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "recipe",
            "max_model_len": self.limits.max_prompt_tokens + self.limits.max_tokens,
        }
        return {"object": "list", "data": [entry]}


def create_app(server: ModelServer) -> "FastAPI":
    """The FastAPI app: thin routes over `ModelServer`, every error as OpenAI's error object."""
    from anyio import to_thread
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="recipe serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.limits = server.limits  # uvicorn_server reads the connection limits from here

    def error_response(error: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body, status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    async def read_body(request: Request) -> dict[str, Any]:
        server.check_key(request.headers.get("authorization"))
        limit = server.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body has {declared} bytes, the limit is {limit}", code="request_too_large")
        # Read chunk by chunk and stop at the limit: a chunked body declares no length, and must never be held whole.
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(server.limits.body_timeout_s):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise ApiError(
                            413, f"request body has more than {limit} bytes, the limit", code="request_too_large"
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408, f"request body not received within {server.limits.body_timeout_s:g} s", code="request_timeout"
            ) from None
        except ClientDisconnect:
            log.warning(
                "client %s hung up while sending its request body (%d bytes received)", _peer(request), received
            )
            raise ApiError(400, "client disconnected") from None
        return server.parse_body(b"".join(chunks))

    async def complete(kind: str, body: dict[str, Any]) -> dict[str, Any]:
        with server.slot():
            parse = server.chat_request if kind == "chat" else server.completion_request
            prepared = await to_thread.run_sync(parse, body)
            # The worker thread runs generate; the event loop keeps answering /health and refusing overload.
            return server.response(kind, *await to_thread.run_sync(server.generate, prepared))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        return JSONResponse(await complete("chat", await read_body(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        return JSONResponse(await complete("completions", await read_body(request)))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.check_key(request.headers.get("authorization"))
        return JSONResponse(server.models())

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": server.model_name})

    return app


def _peer(request: Any) -> str:
    client = getattr(request, "client", None)
    return f"{client.host}:{client.port}" if client else "?"


def _timed_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers take over `header_timeout_s`
    (uvicorn itself only times out idle keep-alive connections, so a slow client could hold one open forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._headers_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.warning(
                    "client %s sent no complete request headers within %g s; connection closed",
                    ":".join(map(str, self.client or ("?",))),
                    header_timeout_s,
                )
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


def uvicorn_server(app: "FastAPI", host: str, port: int) -> Any:
    import uvicorn

    limits = getattr(app.state, "limits", None) or ServeLimits()
    # One worker process: the model lives in this process; requests queue on the model's lock.
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            http=_timed_protocol(limits.header_timeout_s),
            limit_concurrency=limits.max_connections,
            timeout_keep_alive=5,
        )
    )


@contextmanager
def running_in_background(app: "FastAPI", host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the app in a thread (port 0 = any free port) and yield its base URL (`http://host:port/v1`)."""
    server = uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, name="recipe-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def check_exposure(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model", host)


def serve_forever(app: "FastAPI", host: str, port: int) -> None:
    uvicorn_server(app, host, port).run()


# ---------------------------------------------------------------------------------------------- vLLM


def vllm_serve_command(
    model_dir: Path,
    *,
    served_name: str,
    merged: bool | None = None,
    base_model: str | None = None,
    max_lora_rank: int | None = None,
    max_model_len: int | None = None,
    max_tokens: int = 256,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> list[str]:
    """The `vllm serve` command for a `recipe finetune` folder: the merged model (`merged=True`, or by default when
    there is one), else the base model with the adapter as a LoRA module named `served_name`."""
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: model folder not found")
    info = read_training_info(model_dir) or {}
    training = info.get("training") or {}
    merged_dir = model_dir / MERGED_DIR
    use_merged = merged_dir.is_dir() if merged is None else merged
    length = max_model_len or _model_len(training.get("max_length"), max_tokens)
    tail = ["--max-model-len", str(length), "--host", host, "--port", str(port)]
    if use_merged:
        if not merged_dir.is_dir():
            raise ConfigError(
                f"{model_dir}: no merged model in {merged_dir} (train with --merge, or serve the adapter)"
            )
        return ["vllm", "serve", str(merged_dir.resolve()), "--served-model-name", served_name, *tail]
    adapter_config = model_dir / "adapter_config.json"
    if not adapter_config.is_file():
        raise ConfigError(f"{model_dir}: no adapter_config.json; not a LoRA adapter folder")
    adapter = json.loads(adapter_config.read_text(encoding="utf-8"))
    base = base_model or adapter.get("base_model_name_or_path") or training.get("base_model")
    if not base:
        raise ConfigError(f"{model_dir}: the adapter does not name its base model; pass --base-model")
    rank = max_lora_rank or _lora_rank(int(adapter.get("r") or 16))
    command = [
        "vllm",
        "serve",
        base,
        "--enable-lora",
        "--lora-modules",
        f"{served_name}={model_dir.resolve()}",
        "--max-lora-rank",
        str(rank),
    ]
    if (model_dir / "chat_template.jinja").is_file():
        # The template the adapter was trained with, in case the base model's tokenizer has another (or none).
        command += ["--chat-template", str((model_dir / "chat_template.jinja").resolve())]
    return command + tail


def _lora_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} is above vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}")


def _model_len(longest_training_row: int | None, max_tokens: int) -> int:
    # Room for conversations longer than any training row: a quarter more, rounded up to a multiple of 1024.
    needed = (longest_training_row or 2048) * 1.25 + max_tokens
    return max(2048, math.ceil(needed / 1024) * 1024)


def format_command_line(command: list[str]) -> str:
    return shlex.join(command)


# ---------------------------------------------------------------------------------------------- the command

Variant = Literal["auto", "merged", "adapter"]
Dtype = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ServeConfig:
    """Everything `recipe serve` needs; the single source of its defaults (the CLI's are checked against these)."""

    model: str  # a recipe finetune folder, adapter folder, model folder or hub id
    base_model: str | None = None  # an adapter's base; default: its adapter_config.json
    variant: Variant = "auto"
    name: str | None = None  # the model name clients ask for; default: the folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    dtype: Dtype = "auto"
    threads: int | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    project: Path | None = None  # the assistant, for constrained decoding
    constrained: bool = False
    command_syntax: str | None = None
    vllm_adapter: bool = False  # --print-vllm-command: serve the base with the adapter even when merged
    max_lora_rank: int | None = None
    max_model_len: int | None = None

    @property
    def served_name(self) -> str:
        return self.name or Path(self.model).resolve().name


def vllm_command(config: ServeConfig) -> list[str]:
    """The `vllm serve` command line that serves `config`'s model at scale."""
    return vllm_serve_command(
        Path(config.model),
        served_name=config.served_name,
        merged=False if config.vllm_adapter else None,
        base_model=config.base_model,
        max_lora_rank=config.max_lora_rank,
        max_model_len=config.max_model_len,
        max_tokens=config.limits.default_max_tokens,
        host=config.host,
        port=config.port,
    )


def build_server(config: ServeConfig) -> ModelServer:
    """Load the model (and the assistant, for the grammar) and check the key: a server ready for `create_app`."""
    if config.constrained and config.project is None:
        raise ConfigError("--constrained needs --project DIR (the grammar comes from the assistant's flows and domain)")
    api_key = key_from_named_variable(config.api_key_env) if config.api_key_env else None
    backend = LocalModelBackend(
        config.model,
        base_model=config.base_model,
        variant=config.variant,
        dtype=config.dtype,
        threads=config.threads,
        name=config.served_name,
    )
    project = syntax = None
    if config.project is not None:
        from recipe.project import load_project
        from recipe.prompt import choose_syntax

        project = load_project(config.project)
        syntax = choose_syntax(project, config.command_syntax or (backend.training_info or {}).get("command_syntax"))
    check_exposure(config.host, api_key)
    return ModelServer(
        backend,
        config.served_name,
        config.limits,
        project,
        syntax,
        always_constrain=config.constrained,
        api_key=api_key,
    )
