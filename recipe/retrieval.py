"""Flow retrieval as the Rasa runtime does it: which flows the command prompt lists, and in which order.

Found in Rasa Pro's source (RasaHQ/rasa, `rasa/dialogue_understanding/generator/flow_retrieval.py`,
`llm_based_command_generator.py`, `flow_document_template.jinja2`, `rasa/shared/core/flows/flow.py` and
`flows_list.py`, `rasa/shared/core/trackers.py`):

* Training embeds one document per user flow that is not link-only (a guard without variables that is false, e.g.
  `if: False`), guard or not, always-included or not. The document is the flow document template rendered with
  plain Jinja2 and stripped: `<flow name>: <description>`, then per collect step (`should_embed_slots`, default
  true) a line of four spaces, the slot, `: `, the step's description if any, and `, allowed values: <list repr>`
  for bool/categorical slots. The flow name is `name:`, else the id with `_` and `-` turned into spaces. Collect
  steps include those of called flows (a step reached twice counts once). `flow_document` writes that text.
* Each turn: query = the user message as sent (`turns_to_embed` 1; for N > 1 the last N transcript lines, then
  `\\nUSER: <message>`); the vector store (FAISS, max inner product, no normalisation) returns the `num_flows`
  (default 20) most similar documents, sorted by score. The list is always-included flows (file order), then
  flows started earlier (latest start first, within the last 20 user/bot messages), then the similar ones,
  duplicates dropped keeping the first; only then flows whose guard fails are dropped, so a guarded flow can
  take one of the `num_flows` places and leave it empty.
* Config: the command generator's `flow_retrieval:` block, `active` (default true), `embeddings` (default OpenAI
  `text-embedding-3-large`; older releases `text-embedding-ada-002`), `num_flows` (older docs:
  `max_flows_from_semantic_search`; negative means the default), `turns_to_embed` (below 1 means 1),
  `should_embed_slots`.

Inferred, not seen in the source: that ties in score keep file order (FAISS's flat index keeps insertion order for
equal scores in practice). Flows started earlier are those started within the last 20 user/bot messages, the
latest start first (`DialogueState.flow_starts`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recipe.conditions import evaluate
from recipe.embeddings import EmbeddingsClient, EmbeddingsConfig, load_embeddings_config
from recipe.errors import ConfigError
from recipe.llm import PROVIDERS
from recipe.project import GENERATOR_SYNTAX
from recipe.prompt import _allowed_values, _collect_steps, transcript_lines
from recipe.types import Flow, relative
from recipe.yamlio import line_of, load_yaml

if TYPE_CHECKING:
    from recipe.project import Project
    from recipe.tracker import DialogueState

log = logging.getLogger("recipe")

DEFAULT_NUM_FLOWS = 20
DEFAULT_TURNS_TO_EMBED = 1
RUNTIME_DEFAULT_EMBEDDINGS = "openai text-embedding-3-large"
_CONDITION_WORDS = frozenset(
    {"and", "or", "not", "is", "contains", "matches", "true", "false", "null", "none", "undefined", "empty"}
)

STARTED_FLOWS_WINDOW = 20  # user/bot messages back from the current one within which a start counts


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FlowRetrievalConfig:
    """The command generator's `flow_retrieval:` block, with the runtime's defaults."""

    active: bool = True
    embeddings: EmbeddingsConfig | None = None  # None: none configured (the runtime would use its OpenAI default)
    num_flows: int = DEFAULT_NUM_FLOWS
    turns_to_embed: int = DEFAULT_TURNS_TO_EMBED
    should_embed_slots: bool = True
    embeddings_problem: str | None = None  # why the configured embeddings cannot be called from here
    where: str | None = None  # `config.yml:LINE` of the block (or of the generator)


def read_flow_retrieval_config(root: Path) -> FlowRetrievalConfig | None:
    """The retrieval settings of config.yml's single-step command generator; None when config.yml names none."""
    path = root / "config.yml"
    if not path.is_file():
        return None
    data = load_yaml(path)
    shown = relative(path)
    components = data.get("pipeline") if isinstance(data, dict) else None
    for component in components or []:
        if isinstance(component, dict) and str(component.get("name", "")) in GENERATOR_SYNTAX:
            break
    else:
        return None
    block = component.get("flow_retrieval")
    where = f"{shown}:{line_of(component, 'flow_retrieval') if block is not None else line_of(component)}"
    if block is None:
        return FlowRetrievalConfig(where=where)
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: `flow_retrieval` must be a mapping (e.g. {{active: false}})")
    if "num_flows" in block and "max_flows_from_semantic_search" in block:
        raise ConfigError(f"{where}: give `num_flows` or `max_flows_from_semantic_search`, not both")
    num_flows = _integer(
        block.get("num_flows", block.get("max_flows_from_semantic_search", DEFAULT_NUM_FLOWS)), "num_flows", where
    )
    if num_flows < 0:
        log.warning("%s: a negative num_flows means the default (%d), as at runtime", where, DEFAULT_NUM_FLOWS)
        num_flows = DEFAULT_NUM_FLOWS
    turns = _integer(block.get("turns_to_embed", DEFAULT_TURNS_TO_EMBED), "turns_to_embed", where)
    if turns < 1:
        log.warning("%s: turns_to_embed below 1 means 1 (the latest user message), as at runtime", where)
        turns = DEFAULT_TURNS_TO_EMBED
    embeddings, problem = _embeddings_from_config(block.get("embeddings"), root, where)
    return FlowRetrievalConfig(
        active=_boolean(block.get("active", True), "active", where),
        embeddings=embeddings,
        num_flows=num_flows,
        turns_to_embed=turns,
        should_embed_slots=_boolean(block.get("should_embed_slots", True), "should_embed_slots", where),
        embeddings_problem=problem,
        where=where,
    )


def _integer(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: flow_retrieval `{key}` must be an integer, got {value!r}")
    return value


def _boolean(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: flow_retrieval `{key}` must be true or false, got {value!r}")
    return value


def _embeddings_from_config(block: Any, root: Path, where: str) -> tuple[EmbeddingsConfig | None, str | None]:
    """config.yml's `embeddings:` (inline, or a `model_group` of endpoints.yml) as a config we can call, or why not."""
    if block is None:
        return None, None
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: flow_retrieval `embeddings` must be a mapping")
    source = f"{where} (flow_retrieval embeddings)"
    if "model_group" in block:
        group_id = str(block["model_group"])
        endpoints = root / "endpoints.yml"
        data = load_yaml(endpoints) if endpoints.is_file() else None
        groups = data.get("model_groups") if isinstance(data, dict) else None
        group = next((g for g in groups or [] if isinstance(g, dict) and str(g.get("id")) == group_id), None)
        models = group.get("models") if group else None
        if not models or not isinstance(models[0], Mapping):
            raise ConfigError(
                f"{where}: flow_retrieval embeddings name model group `{group_id}`, which "
                f"{relative(endpoints)} does not define (with a model)"
            )
        block, source = models[0], f"{relative(endpoints)} model group {group_id} (flow retrieval embeddings)"
    provider = str(block.get("provider", "openai"))
    if provider not in PROVIDERS:
        return None, f"its embeddings provider `{provider}` is not an OpenAI-compatible endpoint recipe can call"
    return EmbeddingsConfig.from_mapping(block, source=source, strict=False), None


def default_cache_dir() -> Path:
    """Where embeddings are cached when a command has no output folder of its own (shared, content-addressed)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recipe" / "embeddings"


# ---------------------------------------------------------------------------------------------- documents


def default_flow_name(flow_id: str) -> str:
    """The runtime's name for a flow without `name:`."""
    return flow_id.replace("_", " ").replace("-", " ")


def is_link_only(flow: Flow) -> bool:
    """A guard without variables that is false (`if: False`): reachable only through a link or call, never
    embedded or listed by retrieval. A guard on slots is evaluated per turn instead."""
    if flow.guard is None:
        return False
    unquoted = re.sub(r"\"[^\"]*\"|'[^']*'", "", flow.guard)
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_.-]*", unquoted)
    if any(word.lower() not in _CONDITION_WORDS for word in words):
        return False
    return not evaluate(flow.guard, {})


def retrievable_flows(project: Project) -> list[Flow]:
    """The flows the runtime embeds: user flows that are not link-only, in file order."""
    return [flow for flow in project.user_flows if not is_link_only(flow)]


def flow_document(project: Project, flow: Flow, embed_slots: bool = True) -> str:
    """The text the runtime embeds for a flow (see the module docstring for the template it follows)."""
    lines = [f"{flow.name or default_flow_name(flow.id)}: {flow.description}"]
    if embed_slots:
        seen: set[int] = set()
        for step in _collect_steps(project, flow):
            if id(step) in seen:  # a called flow reached twice: its steps count once
                continue
            seen.add(id(step))
            slot = project.slot(step.collect or "")
            allowed = _allowed_values(slot) if slot is not None else None
            lines.append(
                f"    {step.collect}: {step.description or ''}" + (f", allowed values: {allowed}" if allowed else "")
            )
    return "\n".join(lines).strip()


# ---------------------------------------------------------------------------------------------- retrieval


class FlowRetrieval:
    """The flows a prompt lists with retrieval on: always-included, then started earlier, then the top `num_flows`
    by embedding similarity to the user message; guard-failing flows dropped last (see the module docstring)."""

    def __init__(self, config: FlowRetrievalConfig, client: EmbeddingsClient):
        if config.embeddings is None:
            raise ValueError("FlowRetrieval needs an embeddings config")
        self.config = config
        self.client = client
        self._lock = threading.Lock()
        self._documents: dict[tuple[str, ...], np.ndarray] = {}

    def query_text(self, state: DialogueState, user_message: str) -> str:
        """What the runtime embeds for the turn: the message, or the last `turns_to_embed` transcript lines too."""
        if self.config.turns_to_embed > 1:
            history = "\n".join(transcript_lines(state.transcript)[-self.config.turns_to_embed :])
            return f"{history}\nUSER: {user_message}"
        return user_message

    def ranked(self, project: Project, state: DialogueState, user_message: str) -> list[tuple[Flow, float]]:
        """Every retrievable flow with its score, best first (ties in file order)."""
        flows = retrievable_flows(project)
        if not flows:
            return []
        documents = tuple(flow_document(project, flow, self.config.should_embed_slots) for flow in flows)
        with self._lock:
            matrix = self._documents.get(documents)
            if matrix is None:
                matrix = np.asarray(self.client.embed(list(documents)), dtype=np.float64)
                self._documents[documents] = matrix
            query = np.asarray(self.client.embed([self.query_text(state, user_message)])[0], dtype=np.float64)
        if query.shape[0] != matrix.shape[1]:
            raise ConfigError(
                f"{self.client.config.source}: the embeddings model answered vectors of {query.shape[0]} "
                f"and {matrix.shape[1]} numbers; expected one size"
            )
        scores = matrix @ query
        order = sorted(range(len(flows)), key=lambda index: -scores[index])
        return [(flows[index], float(scores[index])) for index in order]

    def select(self, project: Project, startable: list[Flow], state: DialogueState, user_message: str) -> list[Flow]:
        """The flows of the prompt, in the runtime's order; `startable` are the flows whose guard passes now."""
        candidates = retrievable_flows(project)
        by_id = {flow.id: flow for flow in candidates}
        always = [flow for flow in candidates if flow.always_include_in_prompt]
        # Flows started within the last STARTED_FLOWS_WINDOW messages, the latest start first.
        recent = [
            flow_id for flow_id, at in reversed(state.flow_starts) if len(state.transcript) - at < STARTED_FLOWS_WINDOW
        ]
        started = [by_id[flow_id] for flow_id in dict.fromkeys(recent) if flow_id in by_id]
        similar = [flow for flow, _ in self.ranked(project, state, user_message)[: self.config.num_flows]]
        allowed = {flow.id for flow in startable}
        merged: dict[str, Flow] = {}
        for flow in [*always, *started, *similar]:
            merged.setdefault(flow.id, flow)
        return [flow for flow in merged.values() if flow.id in allowed]

    def prefetch(self, messages: list[str]) -> None:
        """Embed many user messages (e.g. every paraphrase) in one request ahead of rendering, instead of one
        request per message as prompts are rendered; only the message is the query when `turns_to_embed` is 1."""
        if self.config.turns_to_embed == 1 and messages:
            with self._lock:
                self.client.embed(messages)

    def training_info(self) -> dict[str, Any]:
        """What the data was built with, for dataset_info.json and `recipe rasa-config`."""
        return flow_retrieval_info(self)


def flow_retrieval_info(retrieval: FlowRetrieval | None) -> dict[str, Any]:
    """`{"active": false}` when the prompts list every startable flow, else the settings to serve with."""
    if retrieval is None or retrieval.config.embeddings is None:
        return {"active": False}
    config = retrieval.config
    return {
        "active": True,
        "embeddings": retrieval.config.embeddings.describe(),
        "num_flows": config.num_flows,
        "turns_to_embed": config.turns_to_embed,
        "should_embed_slots": config.should_embed_slots,
    }


def flow_retrieval_for(
    project: Project,
    embeddings_config: Path | None,
    *,
    cache_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> FlowRetrieval | None:
    """The retrieval a command renders prompts with: `--embeddings-config` turns it on (with config.yml's other
    settings), else config.yml's usable embeddings; None (every startable flow, in file order) otherwise, with a
    warning when the runtime would retrieve but we cannot."""
    settings = read_flow_retrieval_config(project.root)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if embeddings_config is not None:
        embeddings = load_embeddings_config(embeddings_config)
        if settings is not None and not settings.active:
            log.warning(
                "%s turns flow retrieval off, but --embeddings-config turns it on for these prompts: serve "
                "the model with flow_retrieval active and the same embeddings",
                settings.where,
            )
        config = replace(settings or FlowRetrievalConfig(), active=True, embeddings=embeddings, embeddings_problem=None)
        return FlowRetrieval(config, EmbeddingsClient(embeddings, cache_dir=cache, environ=environ))
    if settings is None or not settings.active:
        return None
    problem = settings.embeddings_problem
    if settings.embeddings is not None and problem is None:
        try:
            return FlowRetrieval(settings, EmbeddingsClient(settings.embeddings, cache_dir=cache, environ=environ))
        except ConfigError as error:  # no key for config.yml's embeddings: the same as none configured
            problem = f"its embeddings cannot be called ({error})"
    reason = problem or f"no embeddings are configured (the runtime would use {RUNTIME_DEFAULT_EMBEDDINGS})"
    log.warning(
        "%s: flow retrieval is on (the runtime's default), but %s; the prompts list every startable flow "
        "in file order, so serve the finetuned model with `flow_retrieval: {active: false}`, or give "
        "--embeddings-config FILE to build the prompts with retrieval",
        settings.where,
        reason,
    )
    count = len(retrievable_flows(project))
    if count > settings.num_flows:
        log.warning(
            "the project has %d startable flows; with flow retrieval on, the runtime shows only the %d most "
            "similar (plus always-included and already started ones), not all of them as these prompts "
            "do",
            count,
            settings.num_flows,
        )
    return None
