"""Custom actions run for real on a rasa-sdk action server (recipe/actions.py), end to end.

A real rasa-sdk 3.21 server (its own virtual environment, built once into `.cache/` and reused; see
tests/action_server/harness.py) runs tests/action_server/actions.py on 127.0.0.1. The test assistant
(tests/data/actions_assistant) branches on what those actions set: a city validator that normalises "nyc" and rejects
unknown cities, a hotel search that fills slots, a funds check behind `if: slots.funds_ok`, an action uttering a
domain response by name and one returning a text (failing once per conversation with HTTP 500, to be retried). Its
tests' bot turns are said only on the branch the server's answers select.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
from action_server.harness import (
    HarnessError,
    RunningActionServer,
    free_port,
    rasa_sdk_python,
    running_action_server,
)

from recipe.actions import (
    ActionServer,
    health_url,
    outcome_from_answer,
    read_action_endpoint,
    tracker_json,
    webhook_url,
)
from recipe.cli import main
from recipe.conversation import mocked_datetime, replay_test_case
from recipe.errors import ConfigError
from recipe.project import Project, load_project
from recipe.prompt import (
    COMMAND_PROMPT_VARIABLES,
    DatetimePolicy,
    PromptRenderer,
    choose_syntax,
    choose_template,
    prompt_variables,
)
from recipe.testcases import all_test_cases, load_tests
from recipe.tracker import ActionCall, BotMessage, FrameView, TranscriptLine
from recipe.types import BotStep, Button, TestCase

ASSISTANT = Path(__file__).resolve().parent / "data" / "actions_assistant"
TESTS = ASSISTANT / "e2e_tests"


@pytest.fixture(scope="session")
def action_server(tmp_path_factory) -> RunningActionServer:
    try:
        python = rasa_sdk_python()
        with running_action_server(python, tmp_path_factory.mktemp("action_server")) as server:
            yield server
    except HarnessError as error:
        pytest.fail(f"no rasa-sdk action server for the custom-action tests: {error}", pytrace=False)


def fresh_project() -> Project:
    return load_project(ASSISTANT)


def cases(project: Project) -> dict[str, TestCase]:
    return {case.name: case for case in all_test_cases(load_tests([str(TESTS)], project))}


def runner(url: str, project: Project, cache: Path | None, **options) -> ActionServer:
    """Retries as the CLI makes them, but with a short backoff."""
    return ActionServer(url, project.domain, cache_dir=cache, backoff_base_s=0.02, **options)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/webhook"


def expected_utters(case: TestCase) -> list[list[str]]:
    """Per user turn, what the test says the bot says: response names, or texts for `bot:` steps."""
    turns: list[list[str]] = []
    for step in case.steps:
        if isinstance(step, BotStep):
            turns[-1].append(step.utter or step.text or "")
        elif hasattr(step, "commands"):
            turns.append([])
    return turns


def test_replay_says_the_tests_own_bot_turns(action_server, tmp_path):
    project = fresh_project()
    # Without the server the flows take the wrong branches: that is what this feature is for.
    offline = [w for case in cases(project).values() for t in replay_test_case(project, case) for w in t.warnings]
    assert sum("the test expects" in w for w in offline) >= 8

    project.action_server = server = runner(action_server.url, project, tmp_path / "cache")
    for name, case in cases(project).items():
        turns = replay_test_case(project, case)
        said = [[m.utter or m.text for m in t.events.bot_messages] for t in turns]
        assert said == expected_utters(case), name
        assert [w for t in turns for w in t.warnings] == [], name
        if name == "hotel in nyc":
            # "cheap": the cheapest hotel
            assert turns[1].slots_after == {
                "city": "New York",
                "city_ok": True,
                "hotels_found": 3,
                "hotel_name": "Pod 51",
            }
            assert [m.text for m in turns[1].events.bot_messages] == [
                "I looked at 3 hotels.",  # utter_message(response=..., count=3): filled with the action's variables
                "The best one is Pod 51 in New York. Shall I book it?",
            ]
        if name == "unknown city then Paris":
            assert turns[0].slots_after["city_ok"] is False and turns[0].slots_after["city"] is None
            assert turns[1].slots_after["hotel_name"] == "Hotel Lutetia"
        if name == "balance":
            assert turns[0].events.bot_messages[0] == BotMessage("Your balance is 250 euros.")
    usage = server.usage_summary()
    assert usage["calls"] >= 11 and usage["rejected"] == 0
    # The stub of `stubbed transfer` wins: the server never ran action_check_funds for it.
    senders = {(call["action"], call["sender"].split("::")[-1]) for call in action_server.calls()}
    assert ("action_check_funds", "transfer within funds") in senders
    assert ("action_check_funds", "stubbed transfer") not in senders


def test_rasa_sdk_reads_the_tracker_we_send(action_server, tmp_path):
    """What user code sees, as the server's own `Tracker` parsed it: slots, latest message, events, stack."""
    project = fresh_project()
    project.action_server = runner(action_server.url, project, None)
    case = cases(project)["hotel in nyc"]
    replay_test_case(project, case)
    seen = [
        call
        for call in action_server.calls()
        if call["sender"] == case.id and call["action"] in ("action_validate_city", "action_search_hotels")
    ]
    validate, search = seen[-2], seen[-1]
    assert validate["action"] == "action_validate_city"
    assert validate["slots"] == {"city": "nyc"}
    assert validate["latest_message"] == "I need a cheap hotel in nyc"
    assert validate["stack"] == ["book_hotel"]
    assert validate["event_types"] == [
        "action",
        "session_started",
        "action",
        "user",
        "action",
        "bot",
        "action",
        "bot",
        "action",
        "user",
        "slot",
    ]
    assert search["slots"] == {"city": "New York", "city_ok": True}
    # rasa-sdk's `slots_to_validate()` sees this turn's slot events only, as a validation action expects.
    assert validate["to_validate"] == ["city"] and search["to_validate"] == ["city", "city_ok"]
    again = cases(project)["unknown city then Paris"]
    replay_test_case(project, again)
    second = [c for c in action_server.calls() if c["sender"] == again.id and c["action"] == "action_validate_city"][-1]
    assert second["slots"] == {"city": "Paris", "city_ok": False}  # `city_ok` is from the turn before
    assert second["to_validate"] == ["city"]

    # The tracker JSON is deterministic (it is the cache key) and carries the stack as rasa-sdk's frames.
    call = ActionCall(
        "action_x",
        "c1",
        {"city": "Paris"},
        (
            TranscriptLine("USER", "hi"),
            TranscriptLine("AI", "Hello!", utter="utter_greet"),
            TranscriptLine("USER", "a hotel in Paris"),
        ),
        "a hotel in Paris",
        (FrameView("book_hotel", "user", "ask_city"), FrameView("pattern_correction", "pattern", "s0")),
    )
    first, second = tracker_json(call, ["city", "hotel_name"]), tracker_json(call, ["city", "hotel_name"])
    assert first == second
    assert first["slots"] == {"city": "Paris", "hotel_name": None}
    assert first["latest_message"]["text"] == "a hotel in Paris"
    assert first["stack"] == [
        {
            "frame_id": "frame_0",
            "flow_id": "book_hotel",
            "step_id": "ask_city",
            "type": "flow",
            "frame_type": "regular",
        },
        {"frame_id": "frame_1", "flow_id": "pattern_correction", "step_id": "s0", "type": "pattern_correction"},
    ]
    assert first["latest_event_time"] == first["events"][-1]["timestamp"]


def test_prompts_show_the_values_the_server_set(action_server, tmp_path):
    project = fresh_project()
    project.action_server = runner(action_server.url, project, tmp_path / "cache")
    case = cases(project)["hotel in nyc"]
    turn = replay_test_case(project, case)[2]  # "yes please": after validation and search
    syntax = choose_syntax(project, None)
    renderer = PromptRenderer(choose_template(project, syntax, None), COMMAND_PROMPT_VARIABLES)
    when = DatetimePolicy(include=False, fixed=None, seed=42).for_conversation(case.id, mocked_datetime(case))
    variables = prompt_variables(project, turn.state, turn.text, when)
    assert {s["name"]: s["value"] for s in variables["flow_slots"]}["city"] == "New York"  # normalised by the server
    prompt = renderer.render(variables)
    assert "The best one is Pod 51 in New York. Shall I book it?" in prompt
    assert "New York" in prompt.split("The best one is")[0]  # the slot value, not only the bot's line


def test_a_second_run_calls_nothing(action_server, tmp_path):
    """The cache key is the request, never the URL: run 2 points at a dead port and still replays everything."""
    project = fresh_project()
    project.action_server = first = runner(action_server.url, project, tmp_path / "cache")
    before = len(action_server.calls())
    replays = {name: replay_test_case(project, case) for name, case in cases(project).items()}
    made = first.usage_summary()
    assert made["calls"] > 0 and len(action_server.calls()) - before >= made["calls"]

    project = fresh_project()
    project.action_server = second = runner(dead_url(), project, tmp_path / "cache", max_retries=0)
    seen = len(action_server.calls())
    again = {name: replay_test_case(project, case) for name, case in cases(project).items()}
    usage = second.usage_summary()
    assert usage["calls"] == usage["requests"] == 0
    assert usage["from_cache"] == made["calls"] + made["from_cache"]
    assert len(action_server.calls()) == seen
    for name, turns in replays.items():
        assert [t.slots_after for t in again[name]] == [t.slots_after for t in turns], name
        assert [t.bot_messages for t in again[name]] == [t.bot_messages for t in turns], name


def test_a_transient_server_error_is_retried(action_server):
    project = fresh_project()
    sender = f"retry-{uuid.uuid4().hex}"
    call = ActionCall("action_tell_balance", sender, {}, (TranscriptLine("USER", "balance?"),), "balance?", ())
    server = runner(action_server.url, project, None, max_retries=2)
    assert server.run(call).messages == (BotMessage("Your balance is 250 euros."),)
    usage = server.usage_summary()
    assert (usage["calls"], usage["requests"], usage["retries"]) == (1, 2, 1)
    assert [c.get("failed", False) for c in action_server.calls() if c["sender"] == sender] == [True, False]

    # Without retries left, the failure is one line naming the action, the server and the server's error.
    other = ActionCall("action_tell_balance", f"retry-{uuid.uuid4().hex}", {}, (), None, ())
    with pytest.raises(
        ConfigError,
        match=r"`action_tell_balance` failed on the action server at .* after 1 tries "
        r"\(HTTP 500: the core banking system did not answer\)",
    ):
        runner(action_server.url, project, None, max_retries=0).run(other)


def test_an_unknown_action_names_the_action_and_the_server(action_server):
    project = fresh_project()
    call = ActionCall("action_not_there", "c", {}, (), None, ())
    with pytest.raises(ConfigError, match=rf"`action_not_there` is not on the action server at {action_server.url}"):
        runner(action_server.url, project, None).run(call)


def test_a_server_that_is_down_is_one_line_and_exit_2(tmp_path, capsys):
    url = dead_url()
    for argv in (
        ["coverage", "-o", str(tmp_path / "coverage")],
        ["prepare-data", "--offline", "--no-progress", str(TESTS), "-o", str(tmp_path / "out")],
        ["render-prompt", f"{TESTS / 'actions_du.yml'}::balance", "--step", "1"],
    ):
        start = time.monotonic()
        assert main([*argv, "--project", str(ASSISTANT), "--action-endpoint", url]) == 2
        assert time.monotonic() - start < 5
        err = capsys.readouterr().err
        expected = (
            f"cannot reach the action server at {url} (connection refused); start it with `rasa run actions` "
            "or leave out --action-endpoint"
        )
        assert err.splitlines() == [expected], argv
    assert not (tmp_path / "out" / "params.yaml").exists()  # failed before any other work


def test_prepare_data_end_to_end(action_server, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "prepare-data",
        "--offline",
        "--no-progress",
        "--project",
        str(ASSISTANT),
        str(TESTS),
        "-o",
        str(out),
        "--action-endpoint",
        action_server.url,
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    train = (out / "4_train_test_split" / "ft_splits" / "train.jsonl").read_text(encoding="utf-8")
    val = (out / "4_train_test_split" / "ft_splits" / "val.jsonl").read_text(encoding="utf-8")
    rows = [line for line in (train + val).splitlines() if line.strip()]
    assert len(rows) >= 10
    assert "The best one is Pod 51 in New York" in train + val or "Hotel Lutetia in Paris" in train + val
    assert any(path.suffix == ".json" for path in (out / "cache" / "actions").rglob("*"))
    first = next(line for line in stdout.splitlines() if line.startswith("custom actions:"))
    assert int(first.split()[2]) > 0

    seen = len(action_server.calls())
    assert main(argv) == 0  # the re-run: every action answer comes from OUT/cache/actions
    second = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("custom actions:"))
    assert second.startswith(f"custom actions: 0 run on the action server at {action_server.url}")
    assert len(action_server.calls()) == seen
    assert (out / "4_train_test_split" / "ft_splits" / "train.jsonl").read_text(encoding="utf-8") == train


def test_the_projects_endpoints_yml_is_the_default(action_server, tmp_path, capsys, monkeypatch):
    project = tmp_path / "assistant"
    shutil.copytree(ASSISTANT, project)
    (project / "endpoints.yml").write_text('action_endpoint:\n  url: "http://127.0.0.1:${ACTIONS_PORT}/webhook"\n')
    monkeypatch.setenv("ACTIONS_PORT", str(action_server.port))
    assert main(["coverage", "--project", str(project), "-o", str(tmp_path / "coverage")]) == 0
    assert "custom actions: " in capsys.readouterr().out
    assert main(["coverage", "--project", str(project), "-o", str(tmp_path / "c2"), "--no-action-server"]) == 0
    assert "custom actions: " not in capsys.readouterr().out

    monkeypatch.delenv("ACTIONS_PORT")
    assert main(["coverage", "--project", str(project), "-o", str(tmp_path / "c3")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{project / 'endpoints.yml'}: action_endpoint.url: environment variable ${{ACTIONS_PORT}} is not set"
    )


def test_answers_become_outcomes():
    """The answer shapes rasa-sdk sends (`SlotSet`, `AllSlotsReset`, `BotUttered`, `FollowupAction`, and
    `utter_message` with a text, buttons, a response name, variables, or only an image)."""
    project = fresh_project()
    call = ActionCall("action_x", "c", {"city": "Paris", "amount": 40.0}, (), None, ())
    answer = {
        "events": [
            {"event": "slot", "name": "hotel_name", "value": "Hotel du Nord"},
            {"event": "slot", "name": "no_such_slot", "value": 1},
            {"event": "reset_slots"},
            {"event": "slot", "name": "city", "value": "Lisbon"},
            {
                "event": "bot",
                "text": "Hi",
                "data": {"buttons": [{"title": "Yes", "payload": "/yes"}]},
                "metadata": {"utter_action": "utter_greet"},
            },
            {"event": "pause"},
            {"event": "followup", "name": "action_listen"},
        ],
        "responses": [
            {"text": "Pick one", "buttons": [{"title": "A", "payload": "/a"}], "response": None},
            {"text": None, "response": "utter_greet", "template": "utter_greet"},
            {"text": None, "response": "utter_search_done", "count": 2},
            {"text": None, "image": "https://example.com/map.png"},
        ],
    }
    outcome = outcome_from_answer(answer, call, project.domain)
    assert outcome.slots == (
        ("hotel_name", "Hotel du Nord"),
        ("city", None),
        ("amount", None),
        ("hotel_name", None),
        ("city", "Lisbon"),
    )
    assert outcome.messages == (
        BotMessage("Hi", (Button("Yes", "/yes"),), "utter_greet"),
        BotMessage("Pick one", (Button("A", "/a"),)),
        BotMessage(None, utter="utter_greet"),
        BotMessage("I looked at 2 hotels.", utter="utter_search_done"),
    )
    assert outcome.followup is None  # Rasa's own action_listen: nothing to run
    followup = {"events": [{"event": "followup", "name": "utter_greet"}]}
    assert outcome_from_answer(followup, call, project.domain).followup == "utter_greet"


def test_endpoint_settings(tmp_path):
    path = tmp_path / "endpoints.yml"
    path.write_text(
        "action_endpoint:\n  url: http://actions:5055/webhook\n  token: ${TOKEN}\n  headers: {X-Team: bots}\n"
    )
    endpoint = read_action_endpoint(path, {"TOKEN": "s3cret"})
    assert endpoint is not None
    assert (endpoint.url, dict(endpoint.params), dict(endpoint.headers)) == (
        "http://actions:5055/webhook",
        {"token": "s3cret"},
        {"X-Team": "bots"},
    )
    path.write_text("model_groups: []\n")
    assert read_action_endpoint(path, {}) is None
    assert webhook_url("http://localhost:5055") == "http://localhost:5055/webhook"
    assert health_url("https://proxy/bot/actions/webhook") == "https://proxy/bot/actions/health"
    with pytest.raises(ConfigError, match="expected an http"):
        webhook_url("localhost:5055")
