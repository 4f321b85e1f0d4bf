"""`recipe evaluate`: models over turns with known commands; report.md, report.json and plots."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from recipe.evaluate import EvaluateConfig

EXIT_BELOW_THRESHOLD = 1


class _ModelAction(argparse.Action):
    """Collect models in command-line order; --label, --base-model, --endpoint-model and --api-key-env apply to the
    model named just before them."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:  # type: ignore[no-untyped-def]
        from recipe.evaluate import ModelSpec

        models = list(getattr(namespace, "models", None) or [])
        if self.dest == "model":
            models.append(ModelSpec(model=value))
        elif self.dest == "endpoint":
            models.append(ModelSpec(endpoint=value))
        else:
            if not models:
                parser.error(f"{option_string} must follow the --model or --endpoint it belongs to")
            last = models[-1]
            if self.dest in ("base_model", "endpoint_model") and (last.model is None) == (self.dest == "base_model"):
                kind = "--model" if self.dest == "base_model" else "--endpoint"
                parser.error(f"{option_string} must follow a {kind}")
            if getattr(last, self.dest) is not None:
                parser.error(f"{option_string} given twice for the same model")
            models[-1] = replace(last, **{self.dest: value})
        namespace.models = models


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score models on test turns or val.jsonl: per-command F1, accuracy, validity, latency",
        description="Run one or more models (local folders, or OpenAI-compatible endpoints) over test cases with "
        "commands (e.g. prepare-data's validation suites, or any dialogue-understanding test folder) or over "
        "val.jsonl rows, and write report.md, report.json and plots to --out. Models are shown side by side.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="TESTS_OR_JSONL",
        help="test files or folders, FILE::TEST CASE, or val.jsonl split files",
    )
    models = parser.add_argument_group("models (repeatable; the options after a model apply to it)")
    models.add_argument(
        "--model",
        dest="model",
        action=_ModelAction,
        metavar="DIR",
        help="a recipe finetune folder, adapter folder, model folder or hub id",
    )
    models.add_argument(
        "--base-model",
        dest="base_model",
        action=_ModelAction,
        metavar="PATH_OR_ID",
        help="base model of the preceding adapter --model (default: from its adapter_config.json)",
    )
    models.add_argument(
        "--endpoint",
        dest="endpoint",
        action=_ModelAction,
        metavar="URL",
        help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1",
    )
    models.add_argument(
        "--endpoint-model",
        dest="endpoint_model",
        action=_ModelAction,
        metavar="NAME",
        help="the model name to call at the preceding --endpoint",
    )
    models.add_argument(
        "--api-key-env",
        dest="api_key_env",
        action=_ModelAction,
        metavar="VAR",
        help="environment variable holding the preceding endpoint's key",
    )
    models.add_argument("--label", dest="label", action=_ModelAction, help="name of the preceding model in the report")
    parser.add_argument(
        "-o", "--out", type=Path, default=Path("evaluation"), metavar="DIR", help="report folder (default: evaluation)"
    )
    parser.add_argument(
        "--fail-under",
        metavar="ACCURACY",
        help="exit 1 when a model's turn accuracy is below this (0.8 or 80%%), for CI",
    )
    parser.add_argument(
        "--constrained",
        action="store_true",
        help="constrain answers to the assistant's command grammar (local: logits processor; "
        "endpoints: vLLM structured_outputs)",
    )
    parser.add_argument(
        "--scoring",
        choices=("recipe", "rasa"),
        default="recipe",
        help="recipe (default): per turn as multisets, payload turns and dropped commands left out; "
        "rasa: also write each model's rasa_du_results_<label>.yml in `rasa test du`'s layout, "
        "and print and --fail-under its user-utterance accuracy (report.md shows both)",
    )
    parser.add_argument(
        "--include-derived",
        action="store_true",
        help="also score turns whose commands are derived from the test's assertions",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="answer token bound (default: 64)")
    parser.add_argument(
        "--use-completions",
        action="store_true",
        help="send raw prompts to the endpoints' /completions (models trained on raw prompts)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="endpoint calls in flight per model (default: 1, which keeps latencies honest)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads per local generation (default: torch's, all cores)")
    parser.add_argument("--worst", type=int, default=10, help="worst turns listed per model (default: 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_project_arguments(parser)
    add_action_server_arguments(parser)
    add_prompt_arguments(parser)
    parser.set_defaults(run=run, models=[])


def parse_threshold(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise ConfigError(f"--fail-under {text}: expected an accuracy like 0.8 or 80%") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"--fail-under {text}: expected an accuracy between 0 and 1 (or 0% and 100%)")
    return value


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    from recipe.evaluate import EvaluateConfig

    return EvaluateConfig(
        inputs=tuple(args.inputs),
        models=tuple(args.models),
        out=args.out,
        template_path=args.prompt_template,
        syntax=args.command_syntax,
        constrained=args.constrained,
        scoring=args.scoring,
        include_derived=args.include_derived,
        max_tokens=args.max_tokens,
        use_completions=args.use_completions,
        concurrency=args.concurrency,
        threads=args.threads,
        worst=args.worst,
        fail_under=parse_threshold(args.fail_under),
        datetime=datetime_policy(args, None),  # the model's training info may still turn the date line off
        show_progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from recipe.evaluate import evaluate
    from recipe.evaluate_report import percent, write_report

    setup_logging()
    config = config_from_args(args)
    config.validate()
    project = load_project_from_args(args, flow_retrieval=True)
    connect_action_server(args, project, config.out / "cache" / "actions")  # replays run the custom actions too
    evaluation = evaluate(project, config, warn=lambda text: print(text, file=sys.stderr))
    written = write_report(
        config.out, evaluation.results, config.inputs, evaluation.cases, evaluation.left_out, scoring=config.scoring
    )
    for result in evaluation.results:
        metrics = result.metrics
        rasa = metrics["rasa"]
        if config.scoring == "rasa":
            steps = rasa["number_of_passed_user_utterances"] + rasa["number_of_failed_user_utterances"]
            tests = rasa["number_of_passed_tests"] + rasa["number_of_failed_tests"]
            print(
                f"{result.label} (as rasa test du): user utterances {percent(rasa['accuracy']['user_utterances'])} "
                f"({rasa['number_of_passed_user_utterances']}/{steps}), test cases "
                f"{percent(rasa['accuracy']['test_cases'])} ({rasa['number_of_passed_tests']}/{tests})"
            )
        print(
            f"{result.label}: turn accuracy {percent(metrics['turn_accuracy'])} ({metrics['correct_turns']}/"
            f"{metrics['turns']}), test cases {percent(metrics['test_case_accuracy'])}, empty "
            f"{percent(metrics['empty_rate'])}, unparseable {percent(metrics['unparseable_rate'])}, invalid commands "
            f"{percent(metrics['invalid_command_rate'])}, p50 {metrics['latency']['p50_s'] or 0:.3f} s"
        )
    if evaluation.left_out.message():
        print(evaluation.left_out.message())
    print(f"report: {written[0]}")
    if config.fail_under is not None:
        failing = evaluation.below(config.fail_under, config.scoring)
        if failing:
            print(f"below --fail-under {config.fail_under:.0%}: {', '.join(failing)}", file=sys.stderr)
            return EXIT_BELOW_THRESHOLD
    return 0
