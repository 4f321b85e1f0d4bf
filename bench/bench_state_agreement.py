"""Benchmark: how often the replayed dialogue state contradicts the tests' own bot turns and assertions.

For each assistant, `recipe prepare-data --offline --num-rephrases 0` runs as a user would run it, and the figures
come from its result_summary.yaml: `state_disagreements` (turns after which the replay contradicts the test),
`rows_left_out_disagreeing` and `state_inferences` (what the replay read from the tests' bot turns where an action's
effect was unknown). The assistant with custom actions runs twice: without its action server (its actions' effects
are then read from the tests) and through a real rasa-sdk server on 127.0.0.1 (built like the tests build it, in
its own virtual environment under .cache/).

    python bench/bench_state_agreement.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from action_server.harness import rasa_sdk_python, running_action_server  # noqa: E402

ASSISTANTS = [
    ("bundled example", ROOT, ["e2e_tests"]),
    *[
        (f"conformance/{p.name}", p, [t for t in ("e2e_tests", "dialogue_understanding_tests") if (p / t).is_dir()])
        for p in sorted((ROOT / "tests" / "conformance").iterdir())
        if p.is_dir()
    ],
]
ACTIONS = ROOT / "tests" / "data" / "actions_assistant"


def figures(root: Path, tests: list[str], out: Path, *extra: str) -> dict:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "recipe",
            "prepare-data",
            *[str(root / t) for t in tests],
            "--project",
            str(root),
            "--offline",
            "--no-progress",
            "--num-rephrases",
            "0",
            "-o",
            str(out),
            *extra,
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    summary = YAML(typ="safe").load((out / "result_summary.yaml").read_text(encoding="utf-8"))
    extra_figures = summary["recipe"]
    return {
        "test cases": summary["num_input_e2e_tests"],
        "state disagreements": extra_figures["state_disagreements"],
        "rows left out": extra_figures["rows_left_out_disagreeing"],
        "inferred from bot turns": extra_figures["state_inferences"],
        "rows": summary["num_ft_data_points"],
    }


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="bench_state_"))
    rows: list[tuple[str, dict]] = []
    for name, root, tests in ASSISTANTS:
        rows.append((name, figures(root, tests, scratch / name.replace("/", "_"))))
    rows.append(
        (
            "actions assistant, no action server",
            figures(ACTIONS, ["e2e_tests"], scratch / "offline", "--no-action-server"),
        )
    )
    workdir = scratch / "actions"
    workdir.mkdir()
    shutil.copy(ROOT / "tests" / "action_server" / "actions.py", workdir / "actions.py")
    with running_action_server(rasa_sdk_python(), workdir) as server:
        rows.append(
            (
                "actions assistant, rasa-sdk server",
                figures(ACTIONS, ["e2e_tests"], scratch / "server", "--action-endpoint", server.url),
            )
        )
    columns = list(rows[0][1])
    print("| assistant | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, values in rows:
        print(f"| {name} | " + " | ".join(str(values[c]) for c in columns) + " |")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
