"""Labels are right or absent: what the readers canonicalise or reject, and what the assertion annotator derives."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipe.annotate import annotate_from_assertions
from recipe.commands import SetSlot, StartFlow
from recipe.errors import InputError
from recipe.testcases import all_test_cases, load_tests


def read(tmp_path: Path, project, body: str):
    path = tmp_path / "tests.yml"
    path.write_text(body, encoding="utf-8")
    return all_test_cases(load_tests([str(path)], project))


def annotate(tmp_path: Path, project, steps: str):
    case = read(tmp_path, project, "test_cases:\n  - test_case: t\n    steps:\n" + steps)[0]
    return annotate_from_assertions(project, case).turns


def error_of(tmp_path: Path, project, body: str) -> str:
    with pytest.raises(InputError) as caught:
        read(tmp_path, project, body)
    return str(caught.value)


DU = "test_cases:\n  - test_case: t\n    steps:\n      - user: x\n        commands: [{}]\n"


def test_written_values_are_spelled_as_the_domain_spells_them(tmp_path, example_project):
    case = read(tmp_path, example_project, DU.format("start flow book_rental_car, set slot car_type SUV"))[0]
    assert case.user_steps[0].commands == [StartFlow("book_rental_car"), SetSlot("car_type", "suv")]
    case = read(tmp_path, example_project, DU.format("disambiguate flows book_hotel"))[0]
    assert case.user_steps[0].commands == [StartFlow("book_hotel")]  # a one-option clarification starts the flow


def test_commands_on_slots_the_llm_does_not_fill_are_nlu_commands_not_errors(tmp_path, example_project):
    # DU tests list every command source's output: a controlled slot set there came from NLU or a button.
    case = read(tmp_path, example_project, DU.format("set slot car_available True"))[0]
    assert case.user_steps[0].nlu_commands == [SetSlot("car_available", "True")]
    assert annotate_from_assertions(example_project, case).turns[0].source == "nlu"


@pytest.mark.parametrize(
    "commands, message",
    [
        ("start flow offer_travel_insurance", "reached only through a link or call"),
        ("start flow book_hotl", "did you mean `book_hotel`"),
        ("set slot num_nights 3, set slot num_nights 3", "listed twice"),
    ],
)
def test_commands_the_runtime_would_drop_are_errors_at_their_line(tmp_path, example_project, commands, message):
    error = error_of(tmp_path, example_project, DU.format(commands))
    assert error.startswith(f"{tmp_path / 'tests.yml'}:5: ")
    assert message in error


def test_bad_button_payloads_and_fixture_values_are_errors_where_they_are_written(tmp_path, example_project):
    error = error_of(
        tmp_path,
        example_project,
        "test_cases:\n  - test_case: t\n    steps:\n      - user: /SetSlots(car_kind=compact)\n",
    )
    assert ":4: " in error and "unknown slot `car_kind`" in error
    # A value outside the slot's values is the runtime's to reject (it resets the slot and asks again): valid input.
    read(
        tmp_path,
        example_project,
        "test_cases:\n  - test_case: t\n    steps:\n      - user: /SetSlots(car_type=compakt)\n",
    )
    error = error_of(
        tmp_path,
        example_project,
        "fixtures:\n  - guest:\n      - user_logged_in: maybe\n"
        "test_cases:\n  - test_case: t\n    fixtures: [guest]\n    steps:\n      - user: hi\n",
    )
    assert ":3: " in error and "`maybe`, not a valid bool value" in error
    error = error_of(
        tmp_path,
        example_project,
        "test_cases:\n  - test_case: t\n    fixtures:\n      - nobody\n    steps:\n      - user: hi\n",
    )
    assert ":4: unknown fixture `nobody`" in error


def test_a_slot_check_without_value_is_read_only_when_one_number_fits_one_slot(tmp_path, example_project):
    turns = annotate(
        tmp_path,
        example_project,
        "      - user: a hotel in Oslo for 2 nights\n      - slot_was_set: [{hotel_city: Oslo}, num_nights]\n",
    )
    assert SetSlot("num_nights", "2") in turns[0].commands
    turns = annotate(
        tmp_path,
        example_project,
        "      - user: a hotel in Oslo, 3 nights for 2 people\n"
        "      - slot_was_set: [{hotel_city: Oslo}, num_nights, num_guests]\n",
    )
    assert turns[0].commands is None and "without a value" in turns[0].reason


def test_a_derived_value_the_assistant_rejects_is_labelled_as_asserted(tmp_path, example_project):
    # The runtime sets `limousine` (the assertion holds), then its slot-rejection step resets it: the user said it.
    turns = annotate(
        tmp_path,
        example_project,
        "      - user: I want a limousine\n"
        "        assertions:\n"
        "          - flow_started: {operator: all, flow_ids: [book_rental_car]}\n"
        "          - slot_was_set: [{name: car_type, value: limousine}]\n",
    )
    assert turns[0].commands == [StartFlow("book_rental_car"), SetSlot("car_type", "limousine")]


def test_flow_started_any_labels_the_one_flow_that_explains_the_turn(tmp_path, example_project):
    turns = annotate(
        tmp_path,
        example_project,
        "      - user: I need a hotel in Oslo\n"
        "        assertions:\n"
        "          - flow_started: {operator: any, flow_ids: [book_rental_car, book_hotel]}\n"
        "          - slot_was_set: [{name: hotel_city, value: Oslo}]\n"
        "          - bot_uttered: {utter_name: utter_ask_hotel_checkin_date}\n",
    )
    assert turns[0].commands == [StartFlow("book_hotel"), SetSlot("hotel_city", "Oslo")]


def test_turns_after_a_turn_with_unknown_commands_yield_no_labels(tmp_path, example_project):
    turns = annotate(
        tmp_path,
        example_project,
        "      - user: something the assertions do not explain\n"
        "        assertions:\n"
        "          - slot_was_set: [{name: hotel_city}]\n"
        "      - user: Oslo\n"
        "        commands: [set slot hotel_city Oslo]\n",
    )
    assert turns[0].commands is None
    assert turns[1].commands is None and "comes after turn 1" in turns[1].reason


def test_stubs_for_actions_nothing_runs_or_tests_that_do_not_exist_are_errors(tmp_path, example_project):
    body = (
        "stub_custom_actions:\n  {key}:\n    events: [{{event: slot, name: car_available, value: true}}]\n"
        "test_cases:\n  - test_case: t\n    steps:\n      - user: hi\n"
    )
    error = error_of(tmp_path, example_project, body.format(key="action_check_car_availabilty"))
    assert ":2: " in error and "did you mean `action_check_car_availability`" in error
    error = error_of(tmp_path, example_project, body.format(key="'other test::action_check_car_availability'"))
    assert ":2: " in error and "test case `other test`" in error
    assert read(tmp_path, example_project, body.format(key="'t::action_check_car_availability'"))[0].stubs


def test_a_missing_config_template_matters_only_where_prompts_are_rendered(tmp_path, capsys):
    import shutil

    from recipe.cli import main

    project = tmp_path / "assistant"
    shutil.copytree("flows", project / "flows")
    shutil.copytree("e2e_tests/hotels", project / "e2e_tests" / "hotels")
    shutil.copy("e2e_tests/conftest.yml", project / "e2e_tests" / "conftest.yml")
    (project / "config.yml").write_text(
        "pipeline:\n  - name: CompactLLMCommandGenerator\n    prompt_template: prompts/missing.jinja2\n"
    )
    assert main(["coverage", "--project", str(project), "-o", str(tmp_path / "cov")]) == 0
    capsys.readouterr()
    assert main(["prepare-data", "--project", str(project), "--offline", "-o", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "config.yml:3: prompt template `" + str((project / "prompts/missing.jinja2").resolve()) + "` not found"
    )
