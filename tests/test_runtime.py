"""The runtime command generator: the prompt is the trained one, answers are parsed and validated with reasons,
endpoints are called as Rasa Pro calls them, and local models load from every folder layout `finetune` leaves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rt_artifacts import finetuned_folder, offline

from recipe.annotate import annotate_from_assertions
from recipe.artifacts import read_training_info
from recipe.backends import BackendError, LocalModelBackend, OpenAIBackend, resolve_model
from recipe.cli import main
from recipe.command_validation import validate_commands
from recipe.commands import (
    CancelFlow,
    ChitChat,
    Clarify,
    SetSlot,
    StartFlow,
    Syntax,
    parse_model_output,
)
from recipe.conversation import mocked_datetime, replay_test_case
from recipe.errors import ConfigError
from recipe.grammar import build_grammar
from recipe.project import load_project
from recipe.prompt import PROMPTS_DIR, DatetimePolicy, load_template
from recipe.runtime import CommandGenerator, conversation_state, prompt_setup
from recipe.testcases import all_test_cases, load_tests
from recipe.testing.openai_server import Reply, ScriptedOpenAIServer, prompt_of

REPO = Path(__file__).resolve().parent.parent
V2_TEMPLATE = PROMPTS_DIR / "command_prompt_v2.jinja2"
HOTEL_TEST = "e2e_tests/hotels/hotel_du.yml::hotel step by step with a pinned date"


@pytest.fixture(scope="module")
def project():
    return load_project(REPO)


@pytest.fixture(scope="module")
def template():
    return load_template(V2_TEMPLATE)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, template) -> Path:
    return finetuned_folder(tmp_path_factory.mktemp("models"), template)


@pytest.fixture(scope="module")
def info(finetuned) -> dict:
    return read_training_info(finetuned)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (StartFlow("book_spaceship"), "unknown flow `book_spaceship`"),
        (StartFlow("pattern_chitchat"), "unknown flow `pattern_chitchat`"),
        (StartFlow("offer_travel_insurance"), "reached only through a link or call"),
        (SetSlot("hotel_stars", "5"), "unknown slot `hotel_stars`"),
        (SetSlot("room_type", "penthouse"), "`penthouse` is not a value of categorical slot `room_type`"),
        (SetSlot("confirm_hotel_booking", "maybe"), "not a valid bool value"),
        (SetSlot("num_nights", "three"), "not a valid float value"),
        (SetSlot("user_logged_in", "True"), "slot `user_logged_in` is not filled by the command generator"),
        (Clarify(("book_spaceship", "book_yacht")), "clarify option `book_spaceship`"),
    ],
)
def test_invalid_commands_are_dropped_with_their_reason(project, command, reason):
    kept, dropped = validate_commands([StartFlow("book_hotel"), command], project)
    assert kept == [StartFlow("book_hotel")]
    assert dropped and all(d.item == command for d in dropped)
    assert reason in dropped[0].reason


def test_valid_commands_are_kept_in_order(project):
    commands = [
        StartFlow("book_hotel"),
        SetSlot("room_type", "Suite"),
        SetSlot("hotel_city", "New York"),
        SetSlot("num_nights", "3"),
        SetSlot("hotel_city", None),
        CancelFlow(),
        ChitChat(),
    ]
    assert validate_commands(commands, project) == (commands, [])


def test_clarify_keeps_its_known_options(project):
    kept, dropped = validate_commands([Clarify(("book_hotel", "book_spaceship", "book_rental_car"))], project)
    assert kept == [Clarify(("book_hotel", "book_rental_car"))]
    assert [d.reason for d in dropped] == ["clarify option `book_spaceship` is not a flow that can be started"]


def test_flow_guards_are_checked_against_the_state(project):
    logged_out = conversation_state(project, [])
    logged_in = conversation_state(project, [], slots={"user_logged_in": True})
    kept, dropped = validate_commands([StartFlow("change_flight")], project, logged_out)
    assert kept == [] and "its `if` condition is false now" in dropped[0].reason
    assert validate_commands([StartFlow("change_flight")], project, logged_in) == ([StartFlow("change_flight")], [])


# ---------------------------------------------------------------------------------------------- prompts


def test_conversation_state_from_plain_turns(project, template):
    state = conversation_state(
        project,
        [("user", "I need a hotel"), ("bot", "Which city?")],
        active_flow="book_hotel",
        requested_slot="hotel_city",
        slots={"hotel_checkin_date": "friday"},
    )
    generator = CommandGenerator.for_model(project, ScriptlessBackend(), training_info=None, template_path=V2_TEMPLATE)
    prompt = generator.render(state, "Lisbon")
    assert "Active flow: book_hotel, waiting for slot hotel_city" in prompt
    assert "hotel_checkin_date=friday" in prompt
    in_flow = generator.render(conversation_state(project, [], active_flow="book_hotel"), "hi")
    assert "Active flow: book_hotel\n" in in_flow  # in the flow, but asking for nothing
    assert "USER: I need a hotel\nAI: Which city?\nUSER: Lisbon" in prompt
    for bad, message in [
        (dict(turns=[("robot", "hi")]), "speaker"),
        (dict(turns=[], active_flow="book_spaceship"), "not a flow"),
        (dict(turns=[], active_flow="book_hotel", requested_slot="car_type"), "does not collect"),
        (dict(turns=[], requested_slot="hotel_city"), "needs the active flow"),
        (dict(turns=[], slots={"hotel_stars": 5}), "not in the domain"),
    ]:
        with pytest.raises(ConfigError, match=message):
            conversation_state(project, bad.pop("turns"), **bad)


class ScriptlessBackend:
    """A backend that must never be called (for tests that only render)."""

    name = "none"

    def complete(self, prompt, *, grammar=None):
        raise AssertionError("not expected to call the model")


def test_prompt_is_exactly_what_render_prompt_prints(project, capsys):
    main(["render-prompt", HOTEL_TEST, "--step", "3", "--project", str(REPO)])
    printed = capsys.readouterr().out
    test_case = all_test_cases(load_tests([HOTEL_TEST], project))[0]
    turn = replay_test_case(project, test_case, annotate_from_assertions(project, test_case).commands_for)[2]
    generator = CommandGenerator.for_model(project, ScriptlessBackend(), template_path=V2_TEMPLATE)
    when = DatetimePolicy().for_conversation(test_case.id, mocked_datetime(test_case))
    assert generator.render(turn.state, turn.text, when) + "\n" == printed


def test_template_comes_from_the_training_info_and_a_mismatch_is_loud(project, info, template, tmp_path, caplog):
    setup = prompt_setup(project, info)
    assert setup.template.text == template.text and setup.syntax is Syntax.V2 and not setup.warnings
    assert not prompt_setup(project, info, template_path=V2_TEMPLATE).warnings
    other = tmp_path / "other.jinja2"
    other.write_text(template.text.replace("Answer with actions only", "Answer briefly"), encoding="utf-8")
    with caplog.at_level("WARNING"):
        setup = prompt_setup(project, info, template_path=other)
    assert setup.template.path == str(other)
    assert "PROMPT TEMPLATE MISMATCH" in setup.warnings[0] and "PROMPT TEMPLATE MISMATCH" in caplog.text
    assert "differs from the v2" in prompt_setup(project, info, syntax="v1").warnings[0]


# ---------------------------------------------------------------------------------------------- endpoints


def test_endpoint_is_called_like_rasa_and_the_answer_is_validated(project, info):
    answer = "start flow book_hotel\nset slot hotel_city Lisbon\nset slot hotel_stars 5\nStart flow book_hotel"
    with ScriptedOpenAIServer(lambda body: Reply.text(answer, prompt_tokens=900, completion_tokens=20)) as server:
        generator = CommandGenerator.for_model(
            project, OpenAIBackend(server.base_url, "cmdgen", max_tokens=48), training_info=info
        )
        prediction = generator.predict([("user", "hi"), ("bot", "Hello!")], "a hotel in Lisbon please")
        body = server.requests[0].body
    assert body["messages"] == [{"role": "user", "content": prediction.prompt}]
    assert body["model"] == "cmdgen" and body["temperature"] == 0 and body["max_completion_tokens"] == 48
    assert "structured_outputs" not in body
    assert prediction.prompt == generator.render(
        conversation_state(project, [("user", "hi"), ("bot", "Hello!")]), "a hotel in Lisbon please"
    )
    assert prediction.commands == (StartFlow("book_hotel"), SetSlot("hotel_city", "Lisbon"))
    assert [(d.item, d.unparsed) for d in prediction.dropped] == [
        ("Start flow book_hotel", True),
        (SetSlot("hotel_stars", "5"), False),
    ]
    assert not prediction.parseable and len(prediction.invalid) == 1
    assert (prediction.prompt_tokens, prediction.completion_tokens, prediction.finish_reason) == (900, 20, "stop")
    assert prediction.latency_s > 0 and prediction.overhead_s > 0


def test_constrained_endpoint_gets_the_grammar_and_completions_get_the_raw_prompt(project, info):
    with ScriptedOpenAIServer(lambda body: "cancel flow") as server:
        backend = OpenAIBackend(server.base_url, "cmdgen", use_completions=True)
        generator = CommandGenerator.for_model(project, backend, training_info=info, constrained=True)
        prediction = generator.predict([], "stop it")
        body = server.requests[0].body
    assert server.requests[0].path.endswith("/completions") and body["prompt"] == prediction.prompt
    assert prompt_of(body) == prediction.prompt
    state = conversation_state(project, [])
    assert body["structured_outputs"] == {"regex": generator.grammar(state).regex}
    assert "change_flight" not in generator.grammar(state).flows  # its guard needs a logged-in user
    assert (
        generator.grammar(state).flows
        == build_grammar(
            project,
            Syntax.V2,
            flows=[f for f in build_grammar(project, Syntax.V2).flows if f not in ("change_flight",)],
        ).flows
    )
    assert prediction.commands == (CancelFlow(),) and prediction.parseable


def test_endpoint_failures_are_one_line_errors(project):
    with ScriptedOpenAIServer(lambda body: Reply.error(404, message="no such model")) as server:
        with pytest.raises(BackendError, match="HTTP 404: no such model") as raised:
            OpenAIBackend(server.base_url, "nope", max_retries=0).complete("hi")
        assert raised.value.fatal
    with ScriptedOpenAIServer(lambda body: Reply.error(500)) as server:
        with pytest.raises(BackendError, match="HTTP 500") as raised:
            OpenAIBackend(server.base_url, "cmdgen", max_retries=0).complete("hi")
        assert not raised.value.fatal
        port = server.base_url.split(":")[2].split("/")[0]
    with pytest.raises(BackendError, match="cannot connect") as raised:
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", "cmdgen", max_retries=0, timeout_s=2).complete("hi")
    assert raised.value.fatal
    with pytest.raises(ConfigError, match="expected an http"):
        OpenAIBackend("127.0.0.1:8000", "cmdgen")


# ---------------------------------------------------------------------------------------------- local models


def test_model_folders_are_resolved_like_finetune_leaves_them(finetuned, tmp_path):
    merged = resolve_model(finetuned)
    assert merged.weights == str(finetuned / "merged") and merged.adapter is None and merged.training_info
    adapter = resolve_model(finetuned, variant="adapter")
    assert adapter.adapter == finetuned and adapter.weights == str((finetuned.parent / "base").resolve())
    assert resolve_model(finetuned, variant="adapter", base_model="org/base").weights == "org/base"
    plain = resolve_model(finetuned.parent / "base")
    assert plain.weights == str(finetuned.parent / "base") and plain.adapter is None and plain.training_info is None
    assert resolve_model("org/some-model").weights == "org/some-model"  # a hub id, loaded from the cache

    moved = tmp_path / "moved"
    shutil.copytree(finetuned, moved, ignore=shutil.ignore_patterns("merged"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "../somewhere/base"  # as PEFT records a relative base path
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="pass --base-model"):
        resolve_model(moved)
    with pytest.raises(ConfigError, match="no merged model"):
        resolve_model(moved, variant="merged", base_model="x")
    for bad, message in [
        (tmp_path / "missing", "model folder not found"),
        (moved / "adapter_config.json", "got a file"),
        (tmp_path, "not a model folder"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_model(bad)


def test_model_source_says_whether_it_is_the_merged_model_or_the_adapter(finetuned):
    assert resolve_model(finetuned).describe() == f"the merged model {finetuned / 'merged'}"
    base = (finetuned.parent / "base").resolve()
    assert resolve_model(finetuned, variant="adapter").describe() == f"the adapter {finetuned} on its base {base}"
    assert resolve_model("org/some-model").describe() == "the model org/some-model"


def test_unknown_hub_id_is_a_clear_error():
    offline()
    with pytest.raises(ConfigError, match="cannot load"):
        LocalModelBackend("recipe-tests/no-such-model")


def test_adapter_and_merged_model_answer_alike_and_differ_from_the_base(project, finetuned):
    prompt = "set slot hotel_city"
    merged = LocalModelBackend(finetuned, max_new_tokens=12, threads=1)
    adapter = LocalModelBackend(finetuned, variant="adapter", max_new_tokens=12, threads=1)
    base = LocalModelBackend(finetuned.parent / "base", max_new_tokens=12, threads=1)
    assert merged.finetuned.prompt_format.kind == base.finetuned.prompt_format.kind == "chat"
    answers = [backend.complete(prompt) for backend in (merged, adapter, base)]
    assert answers[0].text == answers[1].text != answers[2].text
    assert answers[0].prompt_tokens == len(merged.encode_messages([{"role": "user", "content": prompt}]))
    assert answers[0].completion_tokens == 12 and answers[0].finish_reason == "length"  # garbage never stops


def test_local_model_constrained_gives_valid_commands_unconstrained_garbage(project, finetuned):
    backend = LocalModelBackend(finetuned, max_new_tokens=32, threads=1)
    free = CommandGenerator.for_model(project, backend)
    constrained = CommandGenerator.for_model(project, backend, constrained=True)
    state = conversation_state(project, [("user", "hi"), ("bot", "Hello! How can I help?")])
    loose = free.predict(state, "I want to rent a car in Porto")
    tight = constrained.predict(state, "I want to rent a car in Porto")
    assert not loose.parseable and not loose.commands
    assert tight.parseable and tight.commands and not tight.dropped and tight.finish_reason == "stop"
    assert parse_model_output(tight.raw_text, Syntax.V2).commands == tight.commands
