"""`recipe render-prompt`: print the exact prompt of one user turn of one test case."""

from __future__ import annotations

import argparse
import json
import logging

from recipe.cli._common import (
    add_action_server_arguments,
    add_project_arguments,
    add_prompt_arguments,
    connect_action_server,
    datetime_policy,
    load_project_from_args,
    setup_logging,
)
from recipe.errors import ConfigError

log = logging.getLogger("recipe")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render-prompt",
        help="print the exact prompt the model sees for one user turn",
        description="Print the exact command-generator prompt for the N-th user turn of a test case to stdout, and "
        "nothing else, so you can see and diff what the model is trained on. Earlier turns are replayed through "
        "the dialogue state tracker with their commands (written in the test, or derived from its assertions).",
    )
    parser.add_argument(
        "test",
        metavar="TESTS::TEST_CASE",
        help="a test file and the test case's name, e.g. "
        "'e2e_tests/hotels/hotel_du.yml::hotel step by step with a pinned date' (the name may be "
        "left out if the file has one)",
    )
    parser.add_argument("--step", type=int, required=True, metavar="N", help="the user turn, 1-based")
    parser.add_argument("--state", action="store_true", help="print the tracker's state before that turn (JSON)")
    add_project_arguments(parser)
    add_prompt_arguments(parser)
    add_action_server_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from recipe.annotate import annotate_from_assertions
    from recipe.conversation import mocked_datetime, replay_test_case
    from recipe.prompt import (
        COMMAND_PROMPT_VARIABLES,
        PromptRenderer,
        choose_syntax,
        choose_template,
        prompt_variables,
        syntax_mismatch,
    )
    from recipe.testcases import all_test_cases, load_tests
    from recipe.tracker import startable_flows

    setup_logging()
    project = load_project_from_args(args, flow_retrieval=True)
    connect_action_server(args, project, None)  # answers kept in memory: one prompt is cheap to replay
    syntax = choose_syntax(project, args.command_syntax)
    template = choose_template(project, syntax, args.prompt_template)
    renderer = PromptRenderer(template, COMMAND_PROMPT_VARIABLES)
    mismatch = syntax_mismatch(template, syntax)
    if mismatch:
        log.warning(mismatch)
    cases = all_test_cases(load_tests([args.test], project))
    if len(cases) != 1:
        raise ConfigError(f"{args.test}: names {len(cases)} test cases; pick one with FILE::TEST CASE NAME")
    test_case = cases[0]
    annotation = annotate_from_assertions(project, test_case)
    turns = replay_test_case(project, test_case, annotation.commands_for)
    if not 1 <= args.step <= len(turns):
        raise ConfigError(f"--step {args.step}: test case `{test_case.name}` has {len(turns)} user turns (1-based)")
    turn = turns[args.step - 1]
    if args.state:
        state = turn.state
        print(
            json.dumps(
                {
                    "test_case": test_case.id,
                    "step": args.step,
                    "user_message": turn.text,
                    "stack": [{"flow": f.flow_id, "kind": f.kind, "step": f.step_id} for f in state.stack],
                    "slots": {name: value for name, value in sorted(state.slots.items())},
                    "startable_flows": [flow.id for flow in startable_flows(project, state.slots)],
                    "transcript": [
                        {"speaker": line.speaker, "text": line.text, "buttons": [b.title for b in line.buttons]}
                        for line in state.transcript
                    ],
                    "commands": [command.as_dict() for command in turn.commands],
                },
                indent=2,
                ensure_ascii=False,
                default=str,
            )
        )
        return 0
    policy = datetime_policy(args, project.config.include_date_time)
    when = policy.for_conversation(test_case.id, mocked_datetime(test_case))
    print(renderer.render(prompt_variables(project, turn.state, turn.text, when)))
    return 0
