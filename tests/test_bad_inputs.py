"""Every kind of input mistake ends as one `path:line: message` line on stderr and exit code 2, never a traceback.

Each folder under tests/bad_inputs/ is a small assistant project with one mistake, described in a comment at the top
of the file that holds it; the line the error must point at carries the marker `# <- error`. The cases run through
the real CLI (`recipe coverage`), from inside tests/bad_inputs/ so that paths read `<case>/...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from recipe.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
MARKER = "# <- error"


@dataclass(frozen=True)
class Case:
    name: str  # folder under tests/bad_inputs
    where: str  # the path the error must name, relative to the case folder ("" = the folder itself)
    says: tuple[str, ...]  # fragments the message must contain: what is wrong, and what was expected
    tests: str | None = None  # TESTS argument, relative to the case folder (None: the CLI's default)


CASES = [
    Case("broken_yaml_flows", "flows/flows.yml", ("invalid YAML", "`[` list opened here is not closed")),
    Case("broken_yaml_domain", "domain.yml", ("invalid YAML", "(quote the value)")),
    Case("broken_yaml_test", "e2e_tests/orders.yml", ("invalid YAML", "quoted string opened here is not closed")),
    Case("duplicate_yaml_key", "domain.yml", ("duplicate key `address`",)),
    Case("tab_indentation", "flows/flows.yml", ("found a tab; indent YAML with spaces",)),
    Case("unknown_test_step", "e2e_tests/orders.yml", ("unknown test step `response`", "expected one of user, bot")),
    Case(
        "unknown_command_word",
        "e2e_tests/orders.yml",
        ("`fill slot address 5 Main Street` is not a command", "expected e.g."),
    ),
    Case("garbled_command", "e2e_tests/orders.yml", ("`StartFlow[order_pizza]` is not a command", "`StartFlow(")),
    Case("keyword_wrong_case", "e2e_tests/orders.yml", ("`Start flow order_pizza` is not a command",)),
    Case(
        "unknown_flow_in_command",
        "e2e_tests/orders.yml",
        ("unknown flow `order_pasta`", "expected one of: order_pizza, check_order"),
    ),
    Case("unknown_slot_in_command", "e2e_tests/orders.yml", ("unknown slot `street`", "expected a slot of the domain")),
    Case(
        "next_unknown_step",
        "flows/flows.yml",
        ("`next` points to unknown step `confirm_order`", "expected a step id of this flow or END"),
    ),
    Case("collect_slot_not_in_domain", "flows/flows.yml", ("collects `phone_number`", "not a slot in the domain")),
    Case("missing_domain", "", ("no domain found", "expected domain.yml, a domain/ folder")),
    Case(
        "empty_test_folder", "e2e_tests", ("no test cases found", "expected YAML files with a top-level `test_cases:`")
    ),
    Case("unknown_fixture", "e2e_tests/orders.yml", ("unknown fixture `hungry_customer`", "conftest.yml")),
    Case(
        "unknown_test_name",
        "e2e_tests/orders.yml",
        ("no test case named `order a small pizza`", "the file has `order a large pizza`"),
        tests="e2e_tests/orders.yml::order a small pizza",
    ),
    Case("user_step_without_text", "e2e_tests/orders.yml", ("user step has no text", "expected `user: <message>`")),
    Case(
        "duplicate_flow_ids",
        "flows/status.yml",
        ("flow `check_order` is already defined at duplicate_flow_ids/flows/flows.yml:9", "must be unique"),
    ),
    Case("flow_without_description", "flows/flows.yml", ("flow `check_order` has no `description` (required)",)),
    Case("step_with_two_kinds", "flows/flows.yml", ("step has action, collect", "expected exactly one of collect")),
    Case("link_not_last", "flows/flows.yml", ("a `link` step must be the last step",)),
    Case("unknown_slot_type", "domain.yml", ("slot `address` has type `string`", "expected one of text, bool")),
    Case("no_flows", "", ("no flows found in no_flows/flows or no_flows/data", "top-level `flows:` key")),
    Case("commands_not_a_list", "e2e_tests/orders.yml", ("`commands` must be a list of command lines",)),
    Case("assertion_wrong_shape", "e2e_tests/orders.yml", ("assertion `slot_was_set` must be a list of {name",)),
    Case("unknown_metadata", "e2e_tests/orders.yml", ("unknown metadata `web_channel`",)),
]


def expected_prefix(case: Case) -> str:
    """`<case>/<file>:<line of the marker>: `, or `<case folder>: ` for mistakes that are about a folder."""
    path = Path(case.name, case.where) if case.where else Path(case.name)
    if (CORPUS / path).is_dir():
        return f"{path}: "
    lines = (CORPUS / path).read_text(encoding="utf-8").splitlines()
    marked = [number for number, text in enumerate(lines, start=1) if MARKER in text]
    assert len(marked) == 1, f"{path} must mark exactly one line with `{MARKER}`"
    return f"{path}:{marked[0]}: "


def cli_args(case: Case, out: Path) -> list[str]:
    tests = [f"{case.name}/{case.tests}"] if case.tests else []
    return ["coverage", *tests, "--project", case.name, "-o", str(out)]


def test_every_case_folder_is_tested():
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(case.name for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_mistake_is_one_line_with_path_and_line(case: Case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(CORPUS)
    code = main(cli_args(case, tmp_path / "out"))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(expected_prefix(case)), lines[0]
    for fragment in case.says:
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the input is known to be good


@pytest.mark.parametrize("name", ["broken_yaml_test", "unknown_flow_in_command", "missing_domain"])
def test_mistake_through_a_real_process_has_no_traceback(name: str, tmp_path):
    case = next(case for case in CASES if case.name == name)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "recipe", *cli_args(case, tmp_path / "out")],
        cwd=CORPUS,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(expected_prefix(case))


MANY = Path(__file__).parent / "data" / "many_problems"


def test_every_problem_of_a_run_is_listed_sorted_by_file_and_line(capsys):
    """Like a compiler: every file is read, then every mistake is printed as path:line, sorted, and the run exits 2."""
    code = main(["coverage", str(MANY / "e2e_tests"), "--project", str(MANY), "-o", str(MANY / "never")])
    lines = capsys.readouterr().err.splitlines()
    marked = [
        f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}:{number}"
        for path in sorted((MANY / "e2e_tests").glob("*.yml"))
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if MARKER in text
    ]
    assert code == 2
    assert len(marked) == 6
    assert [line.split(": ", 1)[0] for line in lines] == marked
    assert not (MANY / "never").exists()


def test_max_errors_caps_the_list_and_says_how_many_more(capsys):
    code = main(["coverage", str(MANY / "e2e_tests"), "--project", str(MANY), "--max-errors", "2"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 3
    assert lines[-1] == "... and 4 more problems (--max-errors 0 shows them all)"
