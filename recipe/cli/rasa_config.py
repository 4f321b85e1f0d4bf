"""`recipe rasa-config`: print the endpoints.yml and config.yml blocks for a served finetuned model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from recipe.cli._common import setup_logging
from recipe.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rasa-config",
        help="print the endpoints.yml model group and config.yml command generator for a served model",
        description="Print the endpoints.yml model group (provider self-hosted, api_base, model name) and the "
        "config.yml command-generator entry (llm: {model_group}, the prompt_template the model was trained with, "
        "include_date_time as in training) that make a Rasa Pro assistant call the finetuned model.",
    )
    parser.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="the recipe finetune folder (its training info gives template, syntax and dates)",
    )
    parser.add_argument("--model-name", required=True, help="the name the server serves the model under")
    parser.add_argument(
        "--api-base", required=True, metavar="URL", help="the server's base URL, e.g. http://llm-host:8000/v1"
    )
    parser.add_argument(
        "--prompt-template",
        metavar="PATH",
        help="template path to write into config.yml "
        "(default: prompts/<name of the trained template>, with a note to copy it there)",
    )
    parser.add_argument(
        "--write-template",
        type=Path,
        metavar="FILE",
        help="write the exact template text the model was trained with to FILE, relative to "
        "--project (e.g. prompts/cmdgen.jinja2), and point prompt_template at it",
    )
    parser.add_argument(
        "--project",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="the assistant project that --write-template writes into; prompt_template is written "
        "relative to it, as Rasa reads it (default: the current folder)",
    )
    parser.add_argument(
        "--command-syntax",
        choices=["v1", "v2", "v3"],
        help="default: from the training info; a syntax contradicting the training info is an error",
    )
    parser.add_argument(
        "--group-id",
        default="finetuned_command_generator",
        help="model group id (default: finetuned_command_generator)",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of the model group (default: 256)")
    parser.add_argument("--api-key-env", metavar="VAR", help="reference ${VAR} as the model group's api_key")
    parser.add_argument(
        "--use-completions", action="store_true", help="the model was trained on raw prompts: send them to /completions"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from recipe.artifacts import read_training_info
    from recipe.rasa_config import rasa_config, write_trained_template

    setup_logging()
    info = None
    if args.model is not None:
        if not args.model.is_dir():
            raise ConfigError(f"{args.model}: model folder not found")
        info = read_training_info(args.model)
        if info is None:
            raise ConfigError(
                f"{args.model}: no recipe_training_info.json; pass --prompt-template and --command-syntax"
            )
    template = args.prompt_template
    if args.write_template is not None:
        target = args.write_template if args.write_template.is_absolute() else args.project / args.write_template
        written = write_trained_template(info, target)
        inside = written.resolve().is_relative_to(args.project.resolve())
        template = os.path.relpath(written.resolve(), args.project.resolve()) if inside else str(written)
    config = rasa_config(
        model_name=args.model_name,
        api_base=args.api_base,
        training_info=info,
        prompt_template=template,
        syntax=args.command_syntax,
        group_id=args.group_id,
        max_tokens=args.max_tokens,
        api_key_env=args.api_key_env,
        use_completions=args.use_completions,
        project_dir=args.project,
    )
    print(config.render(), end="")
    return 0
