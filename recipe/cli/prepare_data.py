"""`recipe prepare-data`: annotate, rephrase, validate, stitch and split the tests into finetuning data."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from recipe.artifacts import SPLITS_DIR
from recipe.cli._common import (
    REPLAY_DEST,
    add_action_server_arguments,
    add_project_arguments,
    add_prompt_arguments,
    add_replay_argument,
    connect_action_server,
    datetime_policy,
    load_project_from_args,
    setup_logging,
)
from recipe.errors import ConfigError

log = logging.getLogger("recipe")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="turn dialogue tests into train/val finetuning data",
        description="Annotate every user turn with its commands, write N paraphrases of each, keep those an oracle "
        "(or, offline, a lexical check) confirms, stitch new conversations from them, render every prompt exactly "
        "as the runtime would, and split by test case into train/val. LLM calls run concurrently, are retried, and "
        "are cached under OUT/cache, so an interrupted run resumes for free. Without an LLM configured (no "
        "--rephrase-config/--teacher-config and no OPENAI_API_KEY) or with --offline, everything runs offline.",
    )
    parser.add_argument(
        "tests",
        nargs="*",
        default=["e2e_tests/"],
        metavar="TESTS",
        help="test files or folders, or FILE::TEST CASE NAME; relative to the current folder or to --project "
        "(default: e2e_tests/)",
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=Path("output"),
        help="output folder; stage outputs are replaced on every run, the LLM cache in OUT/cache is kept "
        "(default: output)",
    )
    parser.add_argument(
        "--num-rephrases",
        type=int,
        default=10,
        help="paraphrases per user message; 0 skips rephrasing (default: 10; offline, the rules write about 5)",
    )
    parser.add_argument(
        "--rephrase-config",
        type=Path,
        metavar="FILE",
        help="YAML with `llm` (provider, model, api_base, ... or model_group) and optionally "
        "`prompt_template` for the rephraser (default model: gpt-4o-mini)",
    )
    parser.add_argument(
        "--teacher-config",
        type=Path,
        metavar="FILE",
        help="YAML LLM config of the teacher that annotates turns without commands (default: openai gpt-4o)",
    )
    parser.add_argument(
        "--oracle-config",
        type=Path,
        metavar="FILE",
        help="YAML LLM config of the oracle that validates paraphrases (default: the teacher's)",
    )
    parser.add_argument(
        "--annotator",
        choices=["auto", "test", "assertions", "llm"],
        default="auto",
        help="where commands come from for turns the test gives none for: auto (teacher when an "
        "LLM is configured, else assertions), test (only written commands), assertions "
        "(derived offline from the test's assertions), llm (teacher) (default: auto)",
    )
    parser.add_argument(
        "--validation",
        choices=["strict", "loose"],
        default="strict",
        help="oracle comparison: strict compares slot values too (normalised), loose slot names only (default: strict)",
    )
    parser.add_argument(
        "--abstention-rows",
        action="store_true",
        help="turns whose commands are empty (the model should do nothing) become `cannot handle` "
        "rows instead of being left out",
    )
    parser.add_argument(
        "--keep-disagreeing",
        action="store_true",
        help="keep rows of turns whose dialogue state the test's own bot turns or assertions "
        "contradict (left out by default; result_summary.yaml lists them)",
    )
    parser.add_argument(
        "--train-frac", type=float, default=0.8, help="share of test cases in train, in (0, 1] (default: 0.8)"
    )
    parser.add_argument(
        "--output-format",
        choices=["instruction", "conversational"],
        default="instruction",
        help="rows as prompt/completion (recipe finetune, TRL), or as user/assistant messages "
        '(Rasa\'s finetuning notebook reads examples["messages"]: use conversational) '
        "(default: instruction)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="LLM calls in flight per role: rephraser, teacher, oracle (default: 16)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="no LLM at all: assertion annotator, rule-based paraphrases, lexical check",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="SHARD_OUT",
        help="instead of a run: merge the output folders of runs over shards of the tests (e.g. one "
        "test file each, each with its own -o) into one data set in -o, deduplicated and split "
        "once (TESTS: every shard's tests, for the split suites; --train-frac and --seed apply)",
    )
    add_project_arguments(parser)
    add_prompt_arguments(parser)
    add_action_server_arguments(parser)
    add_replay_argument(parser, "params.yaml")
    parser.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.train_frac <= 1:
        raise ConfigError(f"--train-frac {args.train_frac}: expected a number in (0, 1]")
    if not 0 <= args.num_rephrases <= 100:
        raise ConfigError(f"--num-rephrases {args.num_rephrases}: expected 0 to 100")
    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {args.max_concurrency}: expected at least 1")
    for flag in ("rephrase_config", "teacher_config", "oracle_config", "prompt_template"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: file not found")
    if args.prompt_template is not None:
        from recipe.llm_roles import check_utf8_file

        check_utf8_file(args.prompt_template, "--prompt-template")


def run(args: argparse.Namespace) -> int:
    from recipe.llm_roles import choose_role_llms
    from recipe.prepare import PrepareConfig, check_output_folder, prepare_data
    from recipe.prepare_summary import failure_lines, summary_lines
    from recipe.prompt import (
        bundled_template,
        choose_syntax,
        choose_template,
        syntax_mismatch,
    )

    setup_logging()
    _check_args(args)
    if args.merge:
        from recipe.prepare import merge_prepared

        project = load_project_from_args(args)
        result = merge_prepared(project, args.merge, args.out, args.tests, args.train_frac, args.seed)
        summary = result.summary
        print(
            f"merged {len(args.merge)} shard(s): {summary['num_ft_data_points']} rows "
            f"({summary['recipe']['rows']['duplicates_dropped']} duplicates dropped); split: "
            f"{result.train_rows} train rows / {result.val_rows} val rows"
        )
        print(f"train/val files: {result.out / SPLITS_DIR}")
        return 0
    check_output_folder(args.out, args.tests, args.project)  # before anything (embeddings, actions) caches there
    project = load_project_from_args(args, flow_retrieval=True, cache_dir=args.out / "cache")
    action_server = connect_action_server(args, project, args.out / "cache" / "actions")
    syntax = choose_syntax(project, args.command_syntax)
    template = choose_template(project, syntax, args.prompt_template)
    mismatch = syntax_mismatch(template, syntax)
    if mismatch:
        log.warning("%s: the model would learn to answer in another syntax than its prompt asks for", mismatch)

    roles = choose_role_llms(
        project_root=project.root,
        offline=args.offline,
        annotator=args.annotator,
        num_rephrases=args.num_rephrases,
        rephrase_config=args.rephrase_config,
        teacher_config=args.teacher_config,
        oracle_config=args.oracle_config,
        openai_key_set=bool(os.environ.get("OPENAI_API_KEY")),
    )
    if roles.offline_reason:  # said, not silent: a user who meant to call an LLM learns why none was called
        log.warning(
            "%s: running offline (assertion annotator, rule-based paraphrases, lexical check); --offline "
            "says so explicitly",
            roles.offline_reason,
        )
    rephrase_template = roles.rephrase_template or bundled_template("rephrase.jinja2")
    config = PrepareConfig(
        tests=args.tests,
        out=args.out,
        syntax=syntax,
        template=template,
        datetime_policy=datetime_policy(args, project.config.include_date_time),
        num_rephrases=args.num_rephrases,
        train_frac=args.train_frac,
        output_format=args.output_format,
        seed=args.seed,
        annotator=args.annotator,
        validation=args.validation,
        abstention_rows=args.abstention_rows,
        keep_disagreeing=args.keep_disagreeing,
        offline=roles.offline,
        max_concurrency=args.max_concurrency,
        rephrase_llm=roles.rephraser,
        rephrase_template=rephrase_template if roles.rephraser else None,
        teacher_llm=roles.teacher,
        oracle_llm=roles.oracle,
        show_progress=not args.no_progress,
        parameters={
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
            if key not in ("run", "command", "merge", REPLAY_DEST)
        }
        | {
            "flows": [str(p) for p in args.flows or []],
            "domain": [str(p) for p in args.domain or []],
            "project": str(args.project),
            "offline": roles.offline,
        },
    )
    result = prepare_data(project, config)
    for line in summary_lines(result.summary):
        print(line)
    print(f"train/val files: {result.out / SPLITS_DIR}")
    if action_server is not None:
        print(action_server.summary_line())
    errors = result.summary["recipe"]["errors"]
    failed = sum(result.summary["recipe"].get("failed_llm_calls", {}).values())
    if errors or failed:
        for line in failure_lines(result.summary):
            print(line, file=sys.stderr)
        print(
            f"{failed or len(errors)} LLM call(s) failed after retries (see errors and failed_llm_calls in "
            "result_summary.yaml); the rows that did not need them are written. Run the same command again to retry "
            "only those: answers already received are cached.",
            file=sys.stderr,
        )
        return 1
    return 0
