"""Benchmark: rendering the command prompt of every user turn of the bundled example, on one core.

Two measurements per template, both in prompts per second:
  render          the conversations are replayed once; then only `prompt_variables` + the Jinja2 render are timed
  replay+render   every repetition replays each test case through the tracker (commands from the annotation,
                  derived once) and renders each of its prompts

Button-payload turns are left out: they never reach the command generator, so they have no prompt.

    python bench/bench_render.py --repeat 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipe.annotate import annotate_from_assertions  # noqa: E402
from recipe.commands import Syntax  # noqa: E402
from recipe.conversation import mocked_datetime, replay_test_case  # noqa: E402
from recipe.project import load_project  # noqa: E402
from recipe.prompt import DatetimePolicy, PromptRenderer, choose_template, prompt_variables  # noqa: E402
from recipe.testcases import all_test_cases, load_tests  # noqa: E402


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity here)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="passes over all turns per measurement")
    args = parser.parse_args()
    print(pin_to_one_core())

    os.chdir(ROOT)
    project = load_project(ROOT)
    cases = all_test_cases(load_tests(["e2e_tests"], project))
    policy = DatetimePolicy()
    annotations = {case.id: annotate_from_assertions(project, case) for case in cases}
    dates = {case.id: policy.for_conversation(case.id, mocked_datetime(case)) for case in cases}
    turns = [
        (case.id, turn)
        for case in cases
        for turn in replay_test_case(project, case, annotations[case.id].commands_for)
        if not turn.is_payload
    ]
    print(f"{len(cases)} test cases, {len(turns)} prompts per pass, {args.repeat} passes")

    for syntax in (Syntax.V1, Syntax.V2):
        renderer = PromptRenderer(choose_template(project, syntax))
        name = Path(renderer.template.path).name
        characters = 0
        start = time.perf_counter()
        for _ in range(args.repeat):
            for case_id, turn in turns:
                characters += len(renderer.render(prompt_variables(project, turn.state, turn.text, dates[case_id])))
        render_s = time.perf_counter() - start
        rendered = len(turns) * args.repeat

        start = time.perf_counter()
        replayed = 0
        for _ in range(args.repeat):
            for case in cases:
                for turn in replay_test_case(project, case, annotations[case.id].commands_for):
                    if not turn.is_payload:
                        renderer.render(prompt_variables(project, turn.state, turn.text, dates[case.id]))
                        replayed += 1
        replay_s = time.perf_counter() - start

        print(
            f"{name}: render {rendered / render_s:,.0f} prompts/s ({render_s / rendered * 1e6:.0f} µs each, "
            f"{characters // rendered:,} characters on average); "
            f"replay+render {replayed / replay_s:,.0f} prompts/s"
        )


if __name__ == "__main__":
    main()
