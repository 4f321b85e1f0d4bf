"""The `recipe` command line: parses arguments and calls the library. Nothing else lives here.

Each subcommand lives in a module with `register(subparsers)`, which adds its parser and sets `run` (a function
from the parsed namespace to an exit code). Modules are imported lazily by `run`, never at `--help` time, so the
core CLI never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from recipe import __version__
from recipe.errors import EXIT_INPUT_ERROR, RecipeError

# subcommand -> module providing register(subparsers)
SUBCOMMANDS = {
    "coverage": "recipe.cli.coverage",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipe",
        description="Turn a CALM assistant's dialogue tests into a finetuned, self-hosted command generator.",
    )
    parser.add_argument("--version", action="version", version=f"recipe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_INPUT_ERROR
    try:
        return int(args.run(args) or 0)
    except RecipeError as error:
        print(error, file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("interrupted; completed LLM calls are cached, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
