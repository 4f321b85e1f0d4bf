"""Running custom actions for real, on the user's action server, through the action server's public HTTP protocol.

A flow step runs a custom action; a test may stub it, and where it does not, the tracker asks an `ActionRunner`.
`ActionServer` is that runner for a running action server (`rasa run actions`, i.e. rasa-sdk, or anything speaking
its protocol): it POSTs `{"next_action", "sender_id", "tracker", "domain", "version"}` to the webhook and turns the
answer (`events`, `responses`) into an `ActionOutcome`: slot events, messages and a followup action.

The tracker JSON is rebuilt from what the replay knows (slots, transcript, stack), deterministically, so the same
dialogue state always makes the same request. Answers are cached on disk by the sha256 of everything that decides
them (action, tracker, domain; never the URL): a re-run, or the same server on another port, calls nothing twice.
Connection errors, timeouts and 5xx answers are retried with backoff; a server that cannot be reached is a one-line
`ConfigError`, found up front by `check_health()` (rasa-sdk serves `GET /health`).

    server = ActionServer(endpoint, project.domain, cache_dir=out / "cache" / "actions")
    server.check_health()
    project.action_server = server  # every tracker now runs custom actions there
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from recipe.cache import JsonCache
from recipe.domain import BUILTIN_SLOTS
from recipe.errors import ConfigError
from recipe.tracker import (
    ActionCall,
    ActionOutcome,
    BotMessage,
    DialogueTracker,
    FrameView,
)
from recipe.types import Button, Domain

log = logging.getLogger("recipe")

# The Rasa version we tell the server we are: rasa-sdk warns when its major.minor differs from ours.
PROTOCOL_VERSION = "3.21.0"
CACHE_FORMAT = 1  # bump when the request we send changes in a way the key does not capture
# Events are timestamped from a fixed origin, one second apart: the same dialogue always gives the same request.
EVENT_TIME_ORIGIN = 1_700_000_000.0
RETRYABLE_STATUS = frozenset({408, 429})  # plus every 5xx
# Keys of a rasa-sdk `utter_message` dict that are not template variables.
_MESSAGE_KEYS = {
    "text",
    "buttons",
    "elements",
    "custom",
    "template",
    "response",
    "image",
    "attachment",
    "quick_replies",
    "json_message",
    "recipient_id",
}
_ENV_VAR = re.compile(r"\$\{([^}]*)\}")
# Rasa's own actions, which a `FollowupAction` may name: no action server has them, and a replay has no use for them
# (`action_listen`: the flows wait for the user anyway).
RASA_DEFAULT_ACTIONS = frozenset(
    {
        "action_listen",
        "action_restart",
        "action_session_start",
        "action_default_fallback",
        "action_deactivate_loop",
        "action_revert_fallback_events",
        "action_default_ask_affirmation",
        "action_default_ask_rephrase",
        "action_two_stage_fallback",
        "action_unlikely_intent",
        "action_back",
        "action_extract_slots",
        "action_validate_slot_mappings",
    }
)


# ---------------------------------------------------------------------------------------------- endpoint config


@dataclass(frozen=True)
class ActionEndpoint:
    """Where the action server is and how to talk to it (the `action_endpoint:` of endpoints.yml)."""

    url: str
    source: str = "--action-endpoint"  # where the URL came from, for error messages
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)  # query parameters (`token` lands here)
    auth: tuple[str, str] | None = None  # basic auth (username, password)


def webhook_url(url: str) -> str:
    """The URL as given; a bare `http://host:port` gets rasa-sdk's `/webhook` path (Rasa would POST to `/` and 404)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"action endpoint {url!r}: expected an http(s) URL like http://localhost:5055/webhook")
    path = parts.path if parts.path not in ("", "/") else "/webhook"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def health_url(url: str) -> str:
    """rasa-sdk serves `/health` beside `/webhook` (also behind a proxy that mounts both under a prefix)."""
    parts = urlsplit(url)
    path = parts.path[: -len("/webhook")] if parts.path.endswith("/webhook") else parts.path.rsplit("/", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, path + "/health", "", ""))


def _interpolate(value: Any, where: str, environ: Mapping[str, str]) -> Any:
    """`${VAR}` in strings replaced from the environment, as Rasa reads endpoints.yml; an unset one is an error."""
    if isinstance(value, dict):
        return {key: _interpolate(item, f"{where}.{key}", environ) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, where, environ) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{where}: environment variable ${{{name}}} is not set")
        return environ[name]

    return _ENV_VAR.sub(replace, value)


def read_action_endpoint(path: Path, environ: Mapping[str, str] | None = None) -> ActionEndpoint | None:
    """The `action_endpoint:` of an endpoints.yml; None when the file has none or only `actions_module` (which
    runs actions inside Rasa's own process: we can only reach a server)."""
    from recipe.yamlio import load_yaml, plain

    environ = os.environ if environ is None else environ
    try:
        data = plain(load_yaml(path))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (action_endpoint, model_groups, ...)")
    section = data.get("action_endpoint")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: action_endpoint must be a mapping with a `url`")
    if section.get("url") is None:
        if section.get("actions_module"):
            log.warning(
                "%s: action_endpoint.actions_module runs actions inside Rasa; recipe needs a running server "
                "(`rasa run actions`, then --action-endpoint URL); custom actions without stubs are not run",
                path,
            )
        return None
    section = _interpolate(section, f"{path}: action_endpoint", environ)
    headers = section.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError(f"{path}: action_endpoint.headers must be a mapping")
    params = dict(section.get("params") or {})
    if section.get("token") is not None:
        params[str(section.get("token_name") or "token")] = str(section["token"])
    auth = None
    basic = section.get("basic_auth")
    if isinstance(basic, dict):
        auth = (str(basic.get("username", "")), str(basic.get("password", "")))
    return ActionEndpoint(
        url=str(section["url"]),
        source=str(path),
        headers={str(k): str(v) for k, v in headers.items()},
        params={str(k): str(v) for k, v in params.items()},
        auth=auth,
    )


# ---------------------------------------------------------------------------------------------- request JSON


def domain_json(domain: Domain) -> dict[str, Any]:
    """The domain as an action server receives it (what `domain` is in user code: slots, responses, actions)."""
    slots: dict[str, Any] = {}
    for name, slot in domain.slots.items():
        entry: dict[str, Any] = {
            "type": slot.type,
            "initial_value": slot.initial_value,
            "influence_conversation": False,
            "mappings": [{"type": mapping} for mapping in slot.mappings] or [{"type": "from_llm"}],
        }
        if slot.type == "categorical":
            entry["values"] = list(slot.values)
        slots[name] = entry
    responses = {
        name: [
            {"text": v.text}
            | ({"buttons": [{"title": b.title, "payload": b.payload} for b in v.buttons]} if v.buttons else {})
            for v in variations
        ]
        for name, variations in domain.responses.items()
    }
    return {
        "version": "3.1",
        "session_config": {"session_expiration_time": 60, "carry_over_slots_to_new_session": True},
        "intents": [],
        "entities": [],
        "slots": slots,
        "responses": responses,
        "actions": sorted(domain.actions),
        "forms": {},
        "e2e_actions": [],
    }


def _stack_json(stack: tuple[FrameView, ...]) -> list[dict[str, Any]]:
    """The dialogue stack as rasa-sdk's `tracker.stack`: user flows are `type: flow` frames, patterns are typed by
    their id; a user flow started while another is active interrupts it."""
    frames: list[dict[str, Any]] = []
    user_below = False
    for index, frame in enumerate(stack):
        entry: dict[str, Any] = {"frame_id": f"frame_{index}", "flow_id": frame.flow_id, "step_id": frame.step_id}
        if frame.kind == "pattern":
            entry["type"] = frame.flow_id
        else:
            kind = "call" if frame.kind == "called" else ("interrupt" if user_below else "regular")
            entry.update(type="flow", frame_type=kind)
            user_below = user_below or frame.kind == "user"
        frames.append(entry)
    return frames


def tracker_json(call: ActionCall, slot_names: list[str]) -> dict[str, Any]:
    """What the server's `Tracker.from_dict` reads, rebuilt from the replay: every domain slot (None when unset),
    the transcript as user/bot events, the values held before this turn as slot events at the session start, and
    this turn's slot events after the latest user message, so `tracker.get_slot`, `latest_message`, `events` and
    `slots_to_validate()` (this turn's slots) work in user code."""
    set_this_turn = {name for name, _ in call.turn_slots}
    held_before = [(name, value) for name, value in call.slots.items() if name not in set_this_turn]
    slots: dict[str, Any] = {name: None for name in slot_names}
    slots.update(call.slots)
    clock = iter(range(1_000_000))
    events: list[dict[str, Any]] = []

    def add(event: dict[str, Any]) -> None:
        events.append({"event": event.pop("event"), "timestamp": EVENT_TIME_ORIGIN + next(clock), **event})

    def action(name: str) -> None:
        add({"event": "action", "name": name, "policy": None, "confidence": None})

    action("action_session_start")
    add({"event": "session_started"})
    for name, value in held_before:
        add({"event": "slot", "name": name, "value": value})
    action("action_listen")
    last_user = max((i for i, line in enumerate(call.transcript) if line.speaker == "USER"), default=-1)
    latest_message: dict[str, Any] = {}
    for index, line in enumerate(call.transcript):
        if line.speaker == "USER":
            if events[-1].get("name") != "action_listen":
                action("action_listen")
            parse_data: dict[str, Any] = {
                "text": line.text,
                "intent": {},
                "entities": [],
                "intent_ranking": [],
                "message_id": f"message_{index}",
                "metadata": {},
            }
            add(
                {
                    "event": "user",
                    "text": line.text,
                    "parse_data": parse_data,
                    "input_channel": None,
                    "message_id": f"message_{index}",
                    "metadata": {},
                }
            )
            if index == last_user:
                latest_message = parse_data
                for name, value in call.turn_slots:
                    add({"event": "slot", "name": name, "value": value})
        else:
            action(line.utter or "action_bot_message")
            data: dict[str, Any] = {
                "elements": None,
                "quick_replies": None,
                "attachment": None,
                "image": None,
                "custom": None,
                "buttons": [{"title": b.title, "payload": b.payload} for b in line.buttons] or None,
            }
            add(
                {
                    "event": "bot",
                    "text": line.text,
                    "data": data,
                    "metadata": {"utter_action": line.utter} if line.utter else {},
                }
            )
    latest_action = next((e["name"] for e in reversed(events) if e["event"] == "action"), "action_listen")
    return {
        "sender_id": call.conversation_id,
        "slots": slots,
        "latest_message": latest_message,
        "latest_event_time": events[-1]["timestamp"],
        "followup_action": None,
        "paused": False,
        "events": events,
        "latest_input_channel": None,
        "active_loop": {},
        "latest_action_name": latest_action,
        "stack": _stack_json(call.stack),
    }


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------------------------- answers


def _buttons(raw: Any) -> tuple[Button, ...]:
    if not isinstance(raw, list):
        return ()
    return tuple(Button(str(b.get("title", "")), str(b.get("payload", ""))) for b in raw if isinstance(b, dict))


def outcome_from_answer(answer: Mapping[str, Any], call: ActionCall, domain: Domain) -> ActionOutcome:
    """An action server's answer as the tracker applies it. Slot events for slots outside the domain are dropped,
    as Rasa drops them; events with no meaning for a replay (reminders, pauses, ...) are ignored."""
    slots: list[tuple[str, Any]] = []
    messages: list[BotMessage] = []
    followup: str | None = None
    current = dict(call.slots)
    for event in answer.get("events") or []:
        kind = event.get("event") if isinstance(event, dict) else None
        if kind == "slot":
            name = str(event.get("name"))
            if name not in domain.slots and name not in BUILTIN_SLOTS:
                log.warning("custom action `%s` set slot `%s`, which is not in the domain; ignored", call.action, name)
                continue
            slots.append((name, event.get("value")))
            current[name] = event.get("value")
        elif kind == "reset_slots":
            slots.extend((name, None) for name, value in current.items() if value is not None)
            current = {}
        elif kind == "bot":
            data = event.get("data") or {}
            utter = (event.get("metadata") or {}).get("utter_action")
            messages.append(BotMessage(event.get("text"), _buttons(data.get("buttons")), utter))
        elif kind == "followup" and str(event.get("name")) in RASA_DEFAULT_ACTIONS:
            log.debug("custom action `%s`: followup `%s` is Rasa's own; ignored", call.action, event.get("name"))
        elif kind == "followup":
            followup = str(event.get("name"))
        else:
            log.debug("custom action `%s`: event `%s` has no effect on a replay; ignored", call.action, kind)
    for response in answer.get("responses") or []:
        if not isinstance(response, dict):
            continue
        message = _message(response, call.action, current, domain)
        if message is not None:
            messages.append(message)
    return ActionOutcome(slots=tuple(slots), messages=tuple(messages), followup=followup)


def _message(response: Mapping[str, Any], action: str, slots: dict[str, Any], domain: Domain) -> BotMessage | None:
    """One `dispatcher.utter_message(...)`: a domain response by name (filled here when the action passes template
    variables, else rendered by the tracker), or a text with buttons."""
    name = response.get("response") or response.get("template")
    if name:
        variables = {k: v for k, v in response.items() if k not in _MESSAGE_KEYS}
        variations = domain.responses.get(str(name))
        if variables and variations and variations[0].text is not None:
            text = DialogueTracker._fill(variations[0].text, {**slots, **variables})
            return BotMessage(text, variations[0].buttons, str(name))
        return BotMessage(None, utter=str(name))
    buttons = _buttons(response.get("buttons"))
    if response.get("text") is None and not buttons:
        log.debug(
            "custom action `%s` sent a message without text (image, custom payload); not in the transcript", action
        )
        return None
    return BotMessage(response.get("text"), buttons)


# ---------------------------------------------------------------------------------------------- cache


class ActionCache(JsonCache):
    """Action-server answers on disk (see `JsonCache`): events and responses."""

    kind = "action cache"
    json_default = str

    def check_answer(self, answer: Any) -> None:
        if not isinstance(answer, dict) or not isinstance(answer.get("events", []), list):
            raise TypeError("bad answer")


# ---------------------------------------------------------------------------------------------- the runner


class ActionServer:
    """An `ActionRunner` that executes custom actions on a running action server (synchronous, thread-safe).

    Backoff before retry n (0-based) is `min(backoff_cap_s, backoff_base_s * 2**n)`; `max_retries` bounds the
    retries of one call. `cache_dir=None` keeps answers in memory only (one run)."""

    def __init__(
        self,
        endpoint: ActionEndpoint | str,
        domain: Domain,
        *,
        cache_dir: Path | str | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 8.0,
        remedy: str = "leave out --action-endpoint",
    ):
        self.endpoint = endpoint if isinstance(endpoint, ActionEndpoint) else ActionEndpoint(endpoint)
        self.url = webhook_url(self.endpoint.url)
        self.domain = domain
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.remedy = remedy
        self.cache = ActionCache(Path(cache_dir)) if cache_dir is not None else None
        self._domain_json = domain_json(domain)
        self._domain_sha256 = hashlib.sha256(_canonical(self._domain_json).encode("utf-8")).hexdigest()
        self._slot_names = sorted(domain.slots)
        self._memo: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._counts = {"calls": 0, "from_cache": 0, "requests": 0, "retries": 0, "rejected": 0}
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            headers=dict(self.endpoint.headers),
            params=dict(self.endpoint.params),
            auth=self.endpoint.auth,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------------------ accounting

    def usage_summary(self) -> dict[str, Any]:
        """Actions run on the server (`calls`), answered from the cache, HTTP requests sent, retries, rejections."""
        with self._lock:
            return {"url": self.url, **self._counts}

    def summary_line(self) -> str:
        usage = self.usage_summary()
        where = f" (cache: {self.cache.directory})" if self.cache else ""
        return (
            f"custom actions: {usage['calls']} run on the action server at {self.url}, {usage['from_cache']} "
            f"from cache, {usage['retries']} retried{where}"
        )

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    # ------------------------------------------------------------------------------------------ calls

    def check_health(self) -> None:
        """Fail within seconds, before any other work, when the server is down. A server that answers but has no
        `/health` (not rasa-sdk) is let through: the webhook is what matters. One try: refused is final."""
        url = health_url(self.url)
        try:
            response = self._client.get(url, timeout=min(self.timeout_s, 5.0))
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        if response.status_code != 200:
            log.info("the action server at %s answered %s on %s; carrying on", self.url, response.status_code, url)

    def run(self, call: ActionCall) -> ActionOutcome:
        """Run `call.action` on the server (or take its answer from the cache) and say what it did."""
        tracker = tracker_json(call, self._slot_names)
        request = {
            "format": CACHE_FORMAT,
            "action": call.action,
            "tracker": tracker,
            "domain_sha256": self._domain_sha256,
        }
        key = hashlib.sha256(_canonical(request).encode("utf-8")).hexdigest()
        answer = self._lookup(key)
        if answer is None:
            answer = self._post(call, tracker)
            self._count("calls")
            with self._lock:
                self._memo[key] = answer
            if self.cache is not None:
                self.cache.put(key, request, answer)
        else:
            self._count("from_cache")
        if answer.get("rejected") is not None:
            self._count("rejected")
            log.warning(
                "custom action `%s` rejected execution on the action server (%s): %s; no events",
                call.action,
                call.conversation_id,
                answer["rejected"],
            )
        return outcome_from_answer(answer, call, self.domain)

    def _lookup(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        answer = self.cache.get(key) if self.cache is not None else None
        if answer is not None:
            with self._lock:
                self._memo[key] = answer
        return answer

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_cap_s, self.backoff_base_s * 2**attempt)

    def _post(self, call: ActionCall, tracker: dict[str, Any]) -> dict[str, Any]:
        payload = {
            "next_action": call.action,
            "sender_id": call.conversation_id,
            "tracker": tracker,
            "domain": self._domain_json,
            "version": PROTOCOL_VERSION,
        }
        body = _canonical(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                log.info("retrying custom action `%s` on %s (%s)", call.action, self.url, failure)
                time.sleep(self._backoff(attempt - 1))
            self._count("requests")
            try:
                response = self._client.post(self.url, content=body, headers=headers)
            except httpx.TimeoutException:
                failure = f"no answer within {self.timeout_s:g}s"
                continue
            except httpx.TransportError as error:
                failure = _transport_reason(error)
                continue
            status = response.status_code
            if status == 200:
                return self._parsed(response, call)
            answer = _error_body(response)
            if status == 400 and answer.get("action_name"):  # rasa-sdk: ActionExecutionRejection
                return {"events": [], "responses": [], "rejected": str(answer.get("error") or "rejected")}
            if status == 404:
                if answer.get("action_name"):
                    raise ConfigError(
                        f"custom action `{call.action}` is not on the action server at {self.url} "
                        "(404 action not found); register it there, or stub it in the test"
                    )
                raise ConfigError(
                    f"the action server at {self.url} answered 404 Not Found; is that its webhook URL "
                    "(e.g. http://localhost:5055/webhook)?"
                )
            detail = str(answer.get("error") or response.text[:200]).strip().splitlines()
            failure = f"HTTP {status}" + (f": {detail[0]}" if detail else "")
            if status >= 500 or status in RETRYABLE_STATUS:
                continue
            raise ConfigError(f"custom action `{call.action}` failed on the action server at {self.url}: {failure}")
        if failure.startswith(("HTTP", "no answer")):
            raise ConfigError(
                f"custom action `{call.action}` failed on the action server at {self.url} after "
                f"{self.max_retries + 1} tries ({failure}); fix the action, or stub it in the test"
            )
        raise ConfigError(
            f"cannot reach the action server at {self.url} ({failure}); start it with "
            f"`rasa run actions` or {self.remedy}"
        )

    def _parsed(self, response: httpx.Response, call: ActionCall) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise ConfigError(
                f"custom action `{call.action}`: the action server at {self.url} answered 200 with "
                "a body that is not JSON"
            ) from None
        if data is None:
            return {"events": [], "responses": []}
        if not isinstance(data, dict) or not isinstance(data.get("events", []), list):
            raise ConfigError(
                f"custom action `{call.action}`: the action server at {self.url} answered 200 without an `events` list"
            )
        return {"events": data.get("events") or [], "responses": data.get("responses") or []}

    def _unreachable(self, error: httpx.TransportError) -> ConfigError:
        return ConfigError(
            f"cannot reach the action server at {self.url} ({_transport_reason(error)}); start it "
            f"with `rasa run actions` or {self.remedy}"
        )


def _transport_reason(error: httpx.TransportError) -> str:
    if isinstance(error, httpx.TimeoutException):
        return "no answer in time"
    text = str(error) or type(error).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text.strip().splitlines()[0]


def _error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
