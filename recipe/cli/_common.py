"""Arguments shared by several subcommands, and turning them into library inputs."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from recipe.errors import ConfigError


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("assistant project")
    group.add_argument("--project", type=Path, default=Path("."), metavar="DIR",
                       help="the assistant's folder: flows under flows/ or data/, domain.yml or domain/, config.yml "
                            "(default: current folder)")  # fmt: skip
    group.add_argument("--flows", type=Path, action="append", metavar="PATH",
                       help="flows file or folder, instead of discovery (repeatable)")
    group.add_argument("--domain", type=Path, action="append", metavar="PATH",
                       help="domain file or folder, instead of discovery (repeatable)")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompt")
    group.add_argument("--command-syntax", choices=["v1", "v2", "v3"],
                       help="command dialect of the completions (default: from config.yml's command generator, "
                            "else v2)")  # fmt: skip
    group.add_argument("--prompt-template", type=Path, metavar="FILE",
                       help="Jinja2 template of the command prompt (default: config.yml's prompt_template, else "
                            "ours for the syntax, in prompts/)")  # fmt: skip
    group.add_argument("--no-datetime", action="store_true",
                       help="leave the date and time out of prompts (serve with include_date_time: false)")
    group.add_argument("--datetime", metavar="ISO",
                       help="put this fixed date and time in every prompt instead of one derived from --seed")
    group.add_argument("--seed", type=int, default=42, help="seed for derived dates, splits and sampling (default: 42)")


def load_project_from_args(args: argparse.Namespace):
    from recipe.project import load_project

    return load_project(args.project, flows=args.flows, domain=args.domain)


def parse_datetime_flag(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--datetime {value}: expected an ISO date and time like 2026-03-05T14:05:09") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")  # fmt: skip
