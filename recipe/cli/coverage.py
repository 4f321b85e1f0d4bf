"""`recipe coverage`: what the tests would teach the model, and the gaps, before any slow or paid work."""

from __future__ import annotations

import argparse
from pathlib import Path

from recipe.cli._common import (
    add_action_server_arguments,
    add_project_arguments,
    connect_action_server,
    load_project_from_args,
    setup_logging,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "coverage",
        help="show which commands, flows and slots the tests cover (run this first)",
        description="Read the assistant and its tests, count the command types, flow starts and slot fills the "
        "tests would teach a command generator (written in `commands:` or derived from assertions), and list the "
        "gaps: unused command types, user flows never started, collected slots never set, turns without commands, "
        "button-payload turns and the command dialects of each file. Writes coverage.md, coverage.json and charts.",
    )
    parser.add_argument(
        "tests",
        nargs="*",
        metavar="TESTS",
        help="test files or folders, or FILE::TEST CASE (default: e2e_tests/ in the project)",
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=Path("coverage"),
        metavar="DIR",
        help="folder for coverage.md, coverage.json and the PNG charts (default: coverage/)",
    )
    add_project_arguments(parser)
    add_action_server_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from recipe.coverage import coverage_report, summary_lines, write_coverage
    from recipe.testcases import load_tests
    from recipe.types import relative

    setup_logging()
    project = load_project_from_args(args)
    action_server = connect_action_server(args, project, args.out / "cache" / "actions")
    specs = args.tests or [str(args.project / "e2e_tests")]
    report = coverage_report(project, load_tests(specs, project))
    paths = write_coverage(report, args.out)
    print("\n".join(summary_lines(report)))
    print(f"wrote {', '.join(relative(path) for path in paths)}")
    if action_server is not None:
        print(action_server.summary_line())
    return 0
