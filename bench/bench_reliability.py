"""Faults injected into `recipe prepare-data`, and what each costs: rows lost, exit code, calls repeated.

    python bench/bench_reliability.py            # on the bundled example's hotel and classic tests

Each scenario runs the real CLI in this process against a scripted OpenAI-compatible server on 127.0.0.1
(recipe.testing.openai_server) and compares with a healthy run. Figures are in BENCHMARKS.md ("Reliability").
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from prepare_llm import ScriptedAssistantLLM, write_llm_config
from ruamel.yaml import YAML

from recipe.cli import main
from recipe.project import load_project
from recipe.testing.openai_server import Reply, ScriptedOpenAIServer

TESTS = ["e2e_tests/hotels/hotel_du.yml", "e2e_tests/e2e/classic_conversations.yml"]


def run(folder: Path, faults, name: str, out: Path | None = None) -> dict:
    project = load_project(ROOT)
    responder = ScriptedAssistantLLM(project, TESTS, faults=faults)
    with ScriptedOpenAIServer(responder) as server:
        config = write_llm_config(folder / f"{name}.yml", server.base_url)
        out = out or folder / name
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(
                [
                    "prepare-data",
                    *TESTS,
                    "-o",
                    str(out),
                    "--no-progress",
                    "--num-rephrases",
                    "3",
                    "--rephrase-config",
                    str(config),
                    "--teacher-config",
                    str(config),
                ]
            )
        hits = server.hits()
    summary_path = out / "result_summary.yaml"
    summary = YAML(typ="safe").load(summary_path.read_text()) if summary_path.exists() else {}
    return {
        "code": code,
        "rows": summary.get("num_ft_data_points"),
        "hits": hits,
        "errors": len(summary.get("recipe", {}).get("errors", [])) if summary else None,
        "failed": sum((summary.get("recipe", {}).get("failed_llm_calls") or {}).values()) if summary else None,
        "stderr_lines": len(err.getvalue().strip().splitlines()),
    }


def main_bench() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clean = run(folder, None, "clean")
        print(f"healthy run: {clean}")
        scenarios = {
            "oracle 400 on every call": lambda k, p, h: Reply.error(400) if _is_oracle(p) else None,
            "teacher 400 on every call": lambda k, p, h: (
                Reply.error(400) if k == "commands" and not _is_oracle(p) else None
            ),
            "oracle answers cut at the token limit": lambda k, p, h: (
                Reply.text("start fl", finish_reason="length") if _is_oracle(p) else None
            ),
        }
        for name, faults in scenarios.items():
            slug = name.replace(" ", "_")
            broken = run(folder, faults, slug)
            again = run(folder, None, slug + "_again", out=folder / slug)  # the same -o, a healthy server
            lost = (1 - broken["rows"] / clean["rows"]) if broken["rows"] is not None else None
            print(
                f"{name}: exit {broken['code']}, rows {broken['rows']}/{clean['rows']} "
                f"({lost:.0%} lost), errors listed {broken['errors']}, failed calls counted {broken['failed']}, "
                f"stderr lines {broken['stderr_lines']}, requests {broken['hits']}; "
                f"re-run on a healthy server: exit {again['code']}, rows {again['rows']}, calls {again['hits']}"
            )


def _is_oracle(prompt: str) -> bool:
    """Oracle prompts carry a paraphrase (ours start `well, `, end ` if that works` or start `Actually `)."""
    latest = prompt.rsplit("Latest user message", 1)[-1]
    return "well, " in latest or "if that works" in latest or "Actually " in latest


if __name__ == "__main__":
    main_bench()
