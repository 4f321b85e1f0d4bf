"""Flow retrieval as the runtime does it, through the real `openai` client and the scripted server's /v1/embeddings.

The server's vectors are bag-of-words hashes (`hashing_embedding`), so each test computes the expected similarity
order itself from the document texts written out by hand here.
"""

from __future__ import annotations

import json
import logging
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from recipe.cli import main
from recipe.embeddings import EmbeddingsClient, EmbeddingsConfig, load_embeddings_config
from recipe.errors import ConfigError
from recipe.project import Project, load_project
from recipe.prompt import PROMPTS_DIR, PromptRenderer, load_template, prompt_variables
from recipe.rasa_config import rasa_config
from recipe.retrieval import (
    FlowRetrieval,
    FlowRetrievalConfig,
    flow_document,
    flow_retrieval_for,
    flow_retrieval_info,
    read_flow_retrieval_config,
)
from recipe.testing import FaultSchedule, Reply, ScriptedOpenAIServer
from recipe.testing.openai_server import hashing_embedding
from recipe.tracker import DialogueState, TranscriptLine

FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.02}

FLOWS = """
flows:
  transfer_money:
    description: Send money to a friend or family member.
    steps:
      - collect: recipient
        description: name of the payee
      - call: verify_identity
      - collect: account
      - collect: amount
        description: amount in euros
  verify_identity:
    if: False
    description: Check who the user is with a secret question.
    steps:
      - collect: is_verified
        description: whether the answer was right
  check_balance:
    name: Balance check
    description: Show the balance of an account.
    steps:
      - collect: account
        description: the account to show
  book_hotel:
    description: Book a hotel room in a city.
    always_include_in_prompt: true
    steps:
      - collect: city
        description: the city of the hotel
  rent-a_car:
    description: Rent a car for a trip.
    steps:
      - collect: city
        description: pick-up city
  premium_support:
    if: slots.is_premium
    description: Talk to premium support about a car problem.
    steps:
      - action: utter_premium
  report_lost_card:
    description: Block a lost or stolen card.
    steps:
      - action: utter_blocked
"""

DOMAIN = """
slots:
  recipient: {type: text}
  amount: {type: float}
  city: {type: text}
  is_verified: {type: bool}
  is_premium: {type: bool}
  account:
    type: categorical
    values: [checking, savings]
responses:
  utter_premium: [{text: "premium"}]
  utter_blocked: [{text: "blocked"}]
"""

# The documents, written out by hand from the runtime's flow document template (recipe/retrieval.py docstring).
DOCUMENTS = {
    "transfer_money": "transfer money: Send money to a friend or family member.\n"
    "    recipient: name of the payee\n"
    "    is_verified: whether the answer was right, allowed values: [True, False]\n"
    "    account: , allowed values: ['checking', 'savings']\n"
    "    amount: amount in euros",
    "check_balance": "Balance check: Show the balance of an account.\n"
    "    account: the account to show, allowed values: ['checking', 'savings']",
    "book_hotel": "book hotel: Book a hotel room in a city.\n    city: the city of the hotel",
    "rent-a_car": "rent a car: Rent a car for a trip.\n    city: pick-up city",
    "premium_support": "premium support: Talk to premium support about a car problem.",
    "report_lost_card": "report lost card: Block a lost or stolen card.",
}


def write_project(root: Path, config: str | None = None, endpoints: str | None = None) -> Project:
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "flows.yml").write_text(FLOWS, encoding="utf-8")
    (root / "domain.yml").write_text(DOMAIN, encoding="utf-8")
    if config is not None:
        (root / "config.yml").write_text(textwrap.dedent(config), encoding="utf-8")
    if endpoints is not None:
        (root / "endpoints.yml").write_text(textwrap.dedent(endpoints), encoding="utf-8")
    return load_project(root)


def embeddings(server: ScriptedOpenAIServer, **extra: Any) -> EmbeddingsConfig:
    return EmbeddingsConfig(provider="self-hosted", model="test-embed", api_base=server.base_url, **extra)


def retrieval(server: ScriptedOpenAIServer, cache: Path | None, **settings: Any) -> FlowRetrieval:
    endpoint = embeddings(server)
    config = FlowRetrievalConfig(embeddings=endpoint, **settings)
    return FlowRetrieval(config, EmbeddingsClient(endpoint, cache_dir=cache, environ={}, **FAST))


def state(slots: dict[str, Any] | None = None, started: tuple[str, ...] = (), transcript=()) -> DialogueState:
    """`started`: flows in the order they were started, each at the start of the transcript."""
    return DialogueState(
        slots=slots or {},
        stack=(),
        transcript=tuple(transcript),
        started_flows=started,
        flow_starts=tuple((flow_id, 0) for flow_id in started),
    )


def by_score(message: str, flow_ids: list[str] | None = None) -> list[str]:
    """The expected similarity order: inner products of the server's vectors, ties in file order."""
    query = hashing_embedding(message)
    ids = flow_ids or list(DOCUMENTS)
    scores = {fid: sum(a * b for a, b in zip(hashing_embedding(DOCUMENTS[fid]), query)) for fid in ids}
    return sorted(ids, key=lambda fid: -scores[fid])


def select(project: Project, message: str, dialogue: DialogueState) -> list[str]:
    variables = prompt_variables(project, dialogue, message, None)
    return [flow["name"] for flow in variables["available_flows"]]


# ---------------------------------------------------------------------------------------------- documents


def test_flow_documents_follow_the_runtime_template(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    for flow_id, expected in DOCUMENTS.items():
        assert flow_document(project, project.flows[flow_id]) == expected
    assert (
        flow_document(project, project.flows["check_balance"], embed_slots=False)
        == DOCUMENTS["check_balance"].split("\n")[0]
    )


# ---------------------------------------------------------------------------------------------- order and selection


def test_order_is_always_included_then_started_then_top_k_by_score(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    message = "my card was stolen, please block the card"
    with ScriptedOpenAIServer() as server:
        project.flow_retrieval = retrieval(server, tmp_path / "cache", num_flows=2)
        top = [fid for fid in by_score(message) if fid != "verify_identity"][:2]
        assert top[0] == "report_lost_card"
        dialogue = state(started=("check_balance", "transfer_money"))  # first start first
        expected = ["book_hotel", "transfer_money", "check_balance"]  # latest start first, as at runtime
        expected += [fid for fid in top if fid not in expected and fid != "premium_support"]
        assert select(project, message, dialogue) == expected
        # without retrieval: every startable flow in file order, today's behaviour
        project.flow_retrieval = None
        assert select(project, message, dialogue) == [
            "transfer_money",
            "check_balance",
            "book_hotel",
            "rent-a_car",
            "report_lost_card",
        ]


def test_started_flows_count_within_the_last_20_messages_latest_start_first(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    message = "my card was stolen, please block the card"
    lines = tuple(TranscriptLine("USER" if i % 2 == 0 else "AI", f"line {i}") for i in range(30))
    with ScriptedOpenAIServer() as server:
        project.flow_retrieval = retrieval(server, tmp_path / "cache", num_flows=0)
        # check_balance at line 5 (25 messages ago), transfer_money at 12, check_balance again at 20.
        recent = DialogueState(
            slots={},
            stack=(),
            transcript=lines,
            started_flows=("check_balance", "transfer_money"),
            flow_starts=(("check_balance", 5), ("transfer_money", 12), ("check_balance", 20)),
        )
        assert select(project, message, recent) == ["book_hotel", "check_balance", "transfer_money"]
        old = DialogueState(
            slots={}, stack=(), transcript=lines, started_flows=("check_balance",), flow_starts=(("check_balance", 5),)
        )
        assert select(project, message, old) == ["book_hotel"]


def test_selection_size_respects_num_flows(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    message = "rent a car in a city"
    with ScriptedOpenAIServer() as server:
        for k in (0, 1, 3, 20):
            project.flow_retrieval = retrieval(server, tmp_path / "cache", num_flows=k)
            ranked = [flow.id for flow, _ in project.flow_retrieval.ranked(project, state(), message)]
            assert ranked == by_score(message)  # every retrievable flow, best first
            similar = [fid for fid in ranked[:k] if fid != "premium_support"]
            expected = ["book_hotel"] + [fid for fid in similar if fid != "book_hotel"]
            assert select(project, message, state()) == expected
            assert len(expected) <= k + 1  # the always-included flow comes on top of the k


def test_guard_failing_and_link_only_flows_never_appear(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    message = "premium support for my car problem"
    with ScriptedOpenAIServer() as server:
        project.flow_retrieval = retrieval(server, tmp_path / "cache", num_flows=3)
        assert by_score(message)[0] == "premium_support"
        assert "premium_support" not in select(project, message, state())
        # its guard holds: now it is listed, as the best match
        assert select(project, message, state({"is_premium": True}))[:2] == ["book_hotel", "premium_support"]
        # started before, then its guard failed: still dropped
        assert "premium_support" not in select(project, message, state(started=("premium_support",)))
        # `if: False` is never embedded, never listed, even when started (called) earlier
        assert "verify_identity" not in select(
            project, "verify identity secret question", state(started=("verify_identity",))
        )
        documents = server.requests[0].body["input"]  # the first request: every document, in one batch
        assert documents == [DOCUMENTS[fid] for fid in DOCUMENTS]  # verify_identity's is not among them


def test_turns_to_embed_adds_transcript_lines_to_the_query(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    transcript = [
        TranscriptLine("USER", "hello"),
        TranscriptLine("AI", "Hi! How can I help?"),
        TranscriptLine("USER", "about my card"),
    ]
    with ScriptedOpenAIServer() as server:
        one = retrieval(server, None)
        two = retrieval(server, None, turns_to_embed=2)
        assert one.query_text(state(transcript=transcript), "it was stolen") == "it was stolen"
        assert two.query_text(state(transcript=transcript), "it was stolen") == (
            "AI: Hi! How can I help?\nUSER: about my card\nUSER: it was stolen"
        )
        two.select(project, project.user_flows, state(transcript=transcript), "it was stolen")
        queries = [request.body["input"] for request in server.requests if len(request.body["input"]) == 1]
        assert queries == [["AI: Hi! How can I help?\nUSER: about my card\nUSER: it was stolen"]]


def test_prompt_from_a_template_lists_the_retrieved_flows(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    message = "rent a car please"
    renderer = PromptRenderer(load_template(PROMPTS_DIR / "command_prompt_v2.jinja2"))
    with ScriptedOpenAIServer() as server:
        project.flow_retrieval = retrieval(server, tmp_path / "cache", num_flows=2)
        prompt = renderer.render(prompt_variables(project, state(started=("check_balance",)), message, None))
    flows_line = next(line for line in prompt.splitlines() if line.startswith('{"flows":'))
    names = [flow["name"] for flow in json.loads(flows_line)["flows"]]
    top = [fid for fid in by_score(message) if fid not in ("verify_identity", "premium_support")]
    expected = ["book_hotel", "check_balance"] + [
        fid for fid in by_score(message)[:2] if fid not in ("book_hotel", "check_balance", "premium_support")
    ]
    assert names == expected and names[2] == top[0] == "rent-a_car"
    assert '{"name":"rent-a_car","description":"Rent a car for a trip.","slots":[{"name":"city",' in flows_line


# ---------------------------------------------------------------------------------------------- the client


def test_documents_are_one_batch_and_a_second_run_sends_nothing(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    cache = tmp_path / "cache"
    with ScriptedOpenAIServer() as server:
        first = retrieval(server, cache)
        first.select(project, project.user_flows, state(), "block my card")
        first.select(project, project.user_flows, state(), "block my card")  # same message: from memory
        first.select(project, project.user_flows, state(), "book a hotel")
        requests = [r for r in server.requests if r.endpoint == "embeddings"]
        assert [len(r.body["input"]) for r in requests] == [len(DOCUMENTS), 1, 1]
        assert requests[0].body["model"] == "test-embed" and requests[0].body["encoding_format"] == "float"
        again = retrieval(server, cache)  # a new run: vectors come from disk
        assert again.select(project, project.user_flows, state(), "block my card") == first.select(
            project, project.user_flows, state(), "block my card"
        )
        assert server.hits(endpoint="embeddings") == 3
        assert again.client.usage.api_calls == 0 and again.client.usage.cache_hits > 0
    # the cache key does not depend on where the model runs
    with ScriptedOpenAIServer() as elsewhere:
        retrieval(elsewhere, cache).select(project, project.user_flows, state(), "book a hotel")
        assert elsewhere.hits() == 0


def test_prefetch_embeds_many_messages_in_one_request(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    with ScriptedOpenAIServer() as server:
        flows = retrieval(server, None)
        flows.prefetch(["block my card", "book a hotel", "rent a car"])
        assert [len(r.body["input"]) for r in server.requests] == [3]
        for message in ("block my card", "book a hotel", "rent a car"):
            flows.select(project, project.user_flows, state(), message)
        assert [len(r.body["input"]) for r in server.requests] == [3, len(DOCUMENTS)]


def test_transient_errors_are_retried(tmp_path: Path) -> None:
    schedule = FaultSchedule().script(Reply.error(500), Reply.error(429, retry_after=0), Reply.disconnect())
    with ScriptedOpenAIServer(schedule) as server:
        client = EmbeddingsClient(embeddings(server), cache_dir=None, environ={}, **FAST)
        assert client.embed(["block my card"]) == [pytest.approx(hashing_embedding("block my card"))]
        assert (client.usage.api_calls, client.usage.retries) == (4, 3)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply.error(401, message="Incorrect API key provided"), "HTTP 401, the API key was refused"),
        (Reply.error(404, message="model not found"), "HTTP 404, no such model or route"),
    ],
)
def test_a_bad_key_or_model_is_one_clear_error(reply: Reply, expected: str) -> None:
    with ScriptedOpenAIServer(FaultSchedule().script(reply)) as server:
        client = EmbeddingsClient(embeddings(server), cache_dir=None, environ={}, **FAST)
        with pytest.raises(ConfigError) as raised:
            client.embed(["hello"])
        assert expected in str(raised.value) and "\n" not in str(raised.value)
        assert server.hits() == 1  # not retried


def test_an_unreachable_endpoint_is_one_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket is closed
    config = EmbeddingsConfig(provider="self-hosted", model="m", api_base=f"http://127.0.0.1:{port}/v1", timeout=2)
    client = EmbeddingsClient(config, cache_dir=None, environ={}, max_retries=1, **FAST)
    with pytest.raises(ConfigError, match="cannot reach the endpoint after 2 attempt"):
        client.embed(["hello"])


def test_embeddings_config_files(tmp_path: Path) -> None:
    path = tmp_path / "emb.yml"
    path.write_text(
        "embeddings:\n  provider: self-hosted\n  model: bge\n  api_base: http://h:8000/v1\n  api_key: ${EMB_KEY}\n",
        encoding="utf-8",
    )
    config = load_embeddings_config(path)
    assert (config.model, config.api_key_env, config.api_key({"EMB_KEY": "k"})) == ("bge", "EMB_KEY", "k")
    with pytest.raises(ConfigError, match="no API key .* set EMB_KEY"):
        config.api_key({})
    for text, message in [
        ("model: x\napi_key: sk-123\n", "literal `api_key`"),
        ("provider: self-hosted\nmodel: x\n", "needs 'api_base'"),
        ("model: x\ncolour: red\n", "unknown embeddings config key 'colour'"),
        ("model: x\ndimensions: -1\n", "positive integer"),
    ]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            load_embeddings_config(path)


# ---------------------------------------------------------------------------------------------- config.yml and CLI


def test_config_yml_flow_retrieval_block(tmp_path: Path) -> None:
    project = write_project(
        tmp_path,
        config="""
        pipeline:
          - name: CompactLLMCommandGenerator
            flow_retrieval:
              max_flows_from_semantic_search: 3
              turns_to_embed: 2
              should_embed_slots: false
              embeddings:
                model_group: embedder
        """,
        endpoints="""
        model_groups:
          - id: embedder
            models:
              - provider: self-hosted
                model: bge-small
                api_base: http://127.0.0.1:9/v1
                extra_rasa_key: ignored
        """,
    )
    config = read_flow_retrieval_config(project.root)
    assert config is not None and config.active and config.embeddings is not None
    assert (config.num_flows, config.turns_to_embed, config.should_embed_slots) == (3, 2, False)
    assert (config.embeddings.provider, config.embeddings.model) == ("self-hosted", "bge-small")
    (tmp_path / "config.yml").write_text(
        "pipeline:\n  - name: CompactLLMCommandGenerator\n    flow_retrieval:\n      num_flows: many\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"config.yml:3: flow_retrieval `num_flows` must be an integer"):
        read_flow_retrieval_config(project.root)
    (tmp_path / "config.yml").write_text("pipeline:\n  - name: NLUCommandAdapter\n", encoding="utf-8")
    assert read_flow_retrieval_config(project.root) is None


def test_retrieval_on_without_embeddings_keeps_file_order_and_warns(tmp_path: Path, caplog) -> None:
    project = write_project(
        tmp_path, config="pipeline:\n  - name: CompactLLMCommandGenerator\n    flow_retrieval:\n      num_flows: 2\n"
    )
    with caplog.at_level(logging.WARNING, logger="recipe"):
        assert flow_retrieval_for(project, None, cache_dir=tmp_path, environ={}) is None
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "serve the finetuned model with `flow_retrieval: {active: false}`" in messages[0]
    assert "6 startable flows" in messages[1] and "only the 2 most similar" in messages[1]
    caplog.clear()
    (tmp_path / "config.yml").write_text(
        "pipeline:\n  - name: CompactLLMCommandGenerator\n    flow_retrieval:\n      active: false\n", encoding="utf-8"
    )
    with caplog.at_level(logging.WARNING, logger="recipe"):
        assert flow_retrieval_for(project, None, cache_dir=tmp_path, environ={}) is None
    assert caplog.records == []
    assert flow_retrieval_info(None) == {"active": False}


def test_render_prompt_with_embeddings_config(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    test = "e2e_tests/hotels/hotel_du.yml::correct the number of nights"
    with ScriptedOpenAIServer() as server:
        path = tmp_path / "emb.yml"
        path.write_text(f"provider: self-hosted\nmodel: test-embed\napi_base: {server.base_url}\n", encoding="utf-8")
        assert main(["render-prompt", test, "--step", "1", "--no-datetime", "--embeddings-config", str(path)]) == 0
        out = capsys.readouterr().out
        assert server.hits(endpoint="embeddings") == 2
        project = load_project(".")
        project.flow_retrieval = flow_retrieval_for(project, path, cache_dir=tmp_path / "xdg" / "recipe" / "embeddings")
        from recipe.annotate import annotate_from_assertions
        from recipe.conversation import replay_test_case
        from recipe.testcases import all_test_cases, load_tests

        case = all_test_cases(load_tests([test], project))[0]
        turn = replay_test_case(project, case, annotate_from_assertions(project, case).commands_for)[0]
        expected = [flow["name"] for flow in prompt_variables(project, turn.state, turn.text, None)["available_flows"]]
        assert server.hits(endpoint="embeddings") == 2  # the CLI's cache served this too
        project.flow_retrieval = None
        file_order = [
            flow["name"] for flow in prompt_variables(project, turn.state, turn.text, None)["available_flows"]
        ]
    assert sorted(expected) == sorted(file_order) and expected != file_order  # the bundled example has < 20 flows
    names = [
        flow["name"]
        for flow in json.loads(next(line for line in out.splitlines() if line.startswith('{"flows":')))["flows"]
    ]
    assert names == expected


def test_cli_bad_key_exits_2_with_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with ScriptedOpenAIServer(FaultSchedule().script(Reply.error(401))) as server:
        path = tmp_path / "emb.yml"
        path.write_text(f"provider: self-hosted\nmodel: test-embed\napi_base: {server.base_url}\n", encoding="utf-8")
        code = main(
            [
                "render-prompt",
                "e2e_tests/hotels/hotel_du.yml::correct the number of nights",
                "--step",
                "1",
                "--no-datetime",
                "--embeddings-config",
                str(path),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "HTTP 401, the API key was refused" in err and len(err.splitlines()) == 1


def test_rasa_config_keeps_retrieval_on_when_the_data_was_built_with_it(tmp_path: Path) -> None:
    with ScriptedOpenAIServer() as server:
        info = flow_retrieval_info(retrieval(server, None, num_flows=5))
    assert info == {
        "active": True,
        "embeddings": {
            "provider": "self-hosted",
            "model": "test-embed",
            "api_base": info["embeddings"]["api_base"],
            "dimensions": None,
        },
        "num_flows": 5,
        "turns_to_embed": 1,
        "should_embed_slots": True,
    }
    training = {"command_syntax": "v2", "prompt_template": "/x/cmdgen.jinja2", "flow_retrieval": info}
    config = rasa_config(
        model_name="m", api_base="http://h:8000/v1", training_info=training, prompt_template=None, syntax=None
    )
    block = config.config["pipeline"][0]["flow_retrieval"]
    assert block == {
        "active": True,
        "embeddings": {"provider": "openai", "model": "test-embed", "api_base": info["embeddings"]["api_base"]},
        "num_flows": 5,
        "turns_to_embed": 1,
        "should_embed_slots": True,
    }
    assert any("keep flow_retrieval on" in note for note in config.notes)
    off = rasa_config(
        model_name="m",
        api_base="http://h:8000/v1",
        training_info={**training, "flow_retrieval": {"active": False}},
        prompt_template=None,
        syntax=None,
    )
    assert off.config["pipeline"][0]["flow_retrieval"] == {"active": False}
    assert json.dumps(info)  # plain values, ready for dataset_info.json
