"""The `recipe` command line: parses arguments and calls the library. Nothing else lives here.

Each subcommand is a module of this package with `register(subparsers)`, which adds its parser and sets `run` (a
function from the parsed namespace to an exit code). A subcommand imports its library lazily inside `run`, so
`recipe --help` never imports torch.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import signal
import sys

from recipe import __version__
from recipe.cli._common import REPLAY_DEST, apply_replay_config
from recipe.errors import EXIT_INPUT_ERROR, InputErrors, RecipeError

# The order subcommands are listed in `--help` (the order users run them in); any other module comes after.
ORDER = ["coverage", "render_prompt", "prepare_data", "finetune", "evaluate", "serve", "rasa_config"]


# What an interrupt (Ctrl-C) leaves behind, per subcommand, and how to go on. `finetune` says it itself (it knows
# whether a checkpoint was saved).
INTERRUPTED = {
    "prepare-data": "interrupted: the previous outputs in the -o folder are unchanged, and every LLM answer received "
    "so far is cached in its cache/ folder; run the same command again to resume without paying twice",
    "evaluate": "interrupted: no report was written; run the same command again",
    "coverage": "interrupted: the coverage report was not written; run the same command again",
    "serve": "server stopped",
    "render-prompt": "interrupted",
    "rasa-config": "interrupted: nothing was written; run the same command again",
    "finetune": "interrupted: run the same command with --resume to continue from the last checkpoint",
}


def _subcommand_modules() -> list[str]:
    found = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    return sorted(found, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipe",
        description="Turn a CALM assistant's dialogue tests into a finetuned, self-hosted command generator.",
    )
    parser.add_argument("--version", action="version", version=f"recipe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _subcommand_modules():
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `recipe ... | head` ends quietly, like any Unix tool
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_INPUT_ERROR
    try:
        if getattr(args, REPLAY_DEST, None) is not None:
            apply_replay_config(parser, argv, args)
        return int(args.run(args) or 0)
    except InputErrors as errors:
        print(errors.format(getattr(args, "max_errors", None)), file=sys.stderr)
        return EXIT_INPUT_ERROR
    except RecipeError as error:
        print(error, file=sys.stderr)
        return EXIT_INPUT_ERROR
    except RuntimeError as error:
        if not str(error).startswith("Symlink loop from"):  # pathlib's words for a link that leads back to itself
            raise
        path = str(error).removeprefix("Symlink loop from").strip(" '\"")
        print(f"{path}: a symbolic link that leads back to itself; expected a file or folder", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        print(f"{error.filename}: too many levels of symbolic links; expected a file or folder", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(
            INTERRUPTED.get(args.command, "interrupted: nothing was finished; run the same command again"),
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
