"""A project in the standard Rasa Pro layout (tests/data/rasa_layout) is read completely.

Flows under data/ in several files and nested folders (next to a non-flows nlu.yml), the domain split over a
domain/ tree, config.yml naming CompactLLMCommandGenerator with its own prompt_template, and tests in nested folders
in all three formats, with conftest.yml fixtures, file fixtures and both forms of stub_custom_actions. Expected
numbers are read from the YAML files here with a plain YAML loader, not taken from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from recipe.cli import main
from recipe.commands import SetSlot, StartFlow, Syntax
from recipe.project import load_project
from recipe.testcases import all_test_cases, load_tests
from recipe.types import TestCase

LAYOUT = Path(__file__).parent / "data" / "rasa_layout"


def plain_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.fixture(scope="module")
def project():
    return load_project(LAYOUT)


@pytest.fixture(scope="module")
def cases(project) -> dict[str, TestCase]:
    return {case.name: case for case in all_test_cases(load_tests([str(LAYOUT / "e2e_tests")], project))}


# ---------------------------------------------------------------------------------------------- project


def test_flows_come_from_every_flows_file_below_data(project):
    flows_files = [p for p in yaml_files(LAYOUT / "data") if "flows" in (plain_yaml(p) or {})]
    expected = [flow_id for path in flows_files for flow_id in plain_yaml(path)["flows"]]
    assert sorted(project.flows) == sorted(expected)
    assert len(flows_files) == 4  # nested folders included: data/flows/account/support/support.yml
    assert [Path(p).name for p in project.flow_files] == [p.name for p in flows_files]
    assert "nlu.yml" not in {Path(p).name for p in project.flow_files}


def test_pattern_overrides_are_flows_but_not_user_flows(project):
    assert "pattern_chitchat" in project.flows
    assert "pattern_chitchat" not in {flow.id for flow in project.user_flows}


def test_domain_is_merged_from_the_domain_tree(project):
    files = [plain_yaml(p) for p in yaml_files(LAYOUT / "domain")]
    assert set(project.domain.slots) == {name for data in files for name in data.get("slots") or {}}
    assert set(project.domain.responses) == {name for data in files for name in data.get("responses") or {}}
    assert project.domain.actions == {name for data in files for name in data.get("actions") or []}
    assert len(project.domain.files) == len(files) == 4


def test_config_names_the_generator_its_syntax_and_template(project):
    config = plain_yaml(LAYOUT / "config.yml")["pipeline"][0]
    assert project.config.generator == config["name"] == "CompactLLMCommandGenerator"
    assert project.config.syntax is Syntax.V2
    assert project.config.prompt_template == (LAYOUT / config["prompt_template"]).resolve()


# ---------------------------------------------------------------------------------------------- tests


def test_every_test_case_is_read(project, cases):
    test_files = [p for p in yaml_files(LAYOUT / "e2e_tests") if "test_cases" in (plain_yaml(p) or {})]
    expected = [case["test_case"] for path in test_files for case in plain_yaml(path)["test_cases"]]
    files = load_tests([str(LAYOUT / "e2e_tests")], project)
    assert len(files) == len(test_files) == 4  # conftest.yml and notes.yml are not test files
    assert sorted(cases) == sorted(expected)
    for case in cases.values():
        raw = next(c for c in plain_yaml(Path(case.file))["test_cases"] if c["test_case"] == case.name)
        assert len(case.steps) == len(raw["steps"])


def test_fixtures_nearest_definition_wins(cases):
    # e2e_tests/conftest.yml says bronze, e2e_tests/orders/conftest.yml silver, e2e/assertions.yml itself gold.
    assert cases["large pizza with mushrooms"].fixture_slots == [("logged_in", True), ("tier", "silver")]
    assert cases["v1 small pizza"].fixture_slots == [("tier", "silver")]  # two folders down: orders/ is nearer
    assert cases["in stock order"].fixture_slots == [("tier", "gold")]  # the file's own fixture
    assert cases["classic support call"].fixture_slots == [("logged_in", True), ("tier", "bronze")]
    assert cases["where is my order"].fixture_slots == []


def test_stubs_apply_per_file_and_per_test_case(cases):
    in_stock = cases["in stock order"].stubs["action_check_stock"]
    out_of_stock = cases["out of stock order"].stubs["action_check_stock"]
    assert in_stock.events == (("in_stock", True),)
    assert out_of_stock.events == (("in_stock", False),)
    assert out_of_stock.responses == ("Sorry, we ran out.",)
    assert cases["large pizza with mushrooms"].stubs["action_check_stock"].events == (("in_stock", True),)
    assert cases["classic support call"].stubs == {}  # another file's stubs never leak


def test_each_step_knows_its_dialect(cases):
    assert [s.syntax for s in cases["large pizza with mushrooms"].user_steps] == [Syntax.V2, Syntax.V2]
    assert [s.syntax for s in cases["v1 small pizza"].user_steps] == [Syntax.V1, Syntax.V1]
    assert [s.syntax for s in cases["short dialect order status"].user_steps] == [Syntax.SHORT, Syntax.SHORT]
    mixed = cases["mixed dialects in one step"].user_steps[0]
    assert mixed.syntax is None
    assert mixed.commands == [
        StartFlow("order_pizza"),
        SetSlot("pizza_size", "medium"),
        SetSlot("pizza_topping", "olives"),
    ]


def test_the_three_test_formats(cases):
    assert cases["in stock order"].user_steps[0].commands is None
    assert [a.kind for a in cases["in stock order"].user_steps[0].assertions] == [
        "flow_started",
        "slot_was_set",
        "bot_uttered",
    ]
    classic = cases["classic support call"]
    assert [type(step).__name__ for step in classic.steps] == [
        "UserStep",
        "BotStep",
        "UserStep",
        "SlotCheckStep",
        "BotStep",
    ]


def test_select_one_test_case_by_name(project):
    spec = f"{LAYOUT / 'e2e_tests/orders/legacy/old_dialects_du.yml'}::short dialect order status"
    assert [case.name for case in all_test_cases(load_tests([spec], project))] == ["short dialect order status"]


# ---------------------------------------------------------------------------------------------- through the CLI


def run_coverage(tmp_path: Path, *args: str) -> dict:
    assert main(["coverage", "--project", str(LAYOUT), "-o", str(tmp_path), *args]) == 0
    return json.loads((tmp_path / "coverage.json").read_text(encoding="utf-8"))


def test_cli_reads_the_whole_project(tmp_path, capsys):
    report = run_coverage(tmp_path)
    assert report["test_cases"] == 8
    assert report["generator"] == "CompactLLMCommandGenerator"
    assert sorted(f["flow"] for f in report["flows"]) == [
        "check_order",
        "contact_support",
        "log_in",
        "order_pizza",
        "verify_identity",
    ]
    assert report["dialects"][str(Path("tests/data/rasa_layout/e2e_tests/orders/legacy/old_dialects_du.yml"))] == {
        "short": 3,
        "v1": 4,
        "v2": 1,
    }
    assert "old_dialects_du.yml: commands in short, v1, v2" in capsys.readouterr().out


def test_cli_flows_and_domain_overrides_replace_discovery(tmp_path):
    alternatives = LAYOUT / "alternatives"
    report = run_coverage(
        tmp_path,
        "--flows",
        str(alternatives / "flows.yml"),
        "--domain",
        str(alternatives / "domain.yml"),
        str(alternatives / "drinks_du.yml"),
    )
    assert [f["flow"] for f in report["flows"]] == ["order_drink"]
    assert [s["slot"] for s in report["slots"]] == ["drink"]
    assert report["command_counts"]["start flow"] == 1


def test_cli_selects_one_test_case(tmp_path):
    spec = f"{LAYOUT / 'e2e_tests/e2e/assertions.yml'}::out of stock order"
    report = run_coverage(tmp_path, spec)
    assert report["test_cases"] == 1
    assert [t["test_case"].split("::")[1] for t in report["turns_without_commands"]] == ["out of stock order"]
