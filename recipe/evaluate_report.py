"""The evaluation report of `recipe evaluate`: report.md (our counting and `rasa test du`'s side by side, per command
type, per flow, the worst turns with their prompts), report.json, each model's results file in `rasa test du`'s YAML
layout (`--scoring rasa`) and the plots (F1 per command type, latency per turn).

Reads what `recipe.evaluate` computed (`ModelResult`, one per model, with its `model_metrics`); computes no metric
itself. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recipe.commands import Syntax
from recipe.evaluate import NAME_ONLY, Case, LeftOut, ModelResult
from recipe.yamlio import write_atomic, write_json

REPORT_MD, REPORT_JSON = "report.md", "report.json"
F1_PNG, LATENCY_PNG = "f1_per_command.png", "latency.png"
_NONE_LEFT_OUT = LeftOut()  # the default: every turn scored (frozen, so one shared instance)


def rasa_report_name(label: str) -> str:
    """`rasa_du_results_<label>.yml`: one results file per model, in `rasa test du`'s layout."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label) or "model"
    return f"rasa_du_results_{safe}.yml"


def write_report(
    out: Path,
    results: Sequence[ModelResult],
    inputs: Sequence[str],
    cases: Sequence[Case],
    left_out: LeftOut = _NONE_LEFT_OUT,
    scoring: str = "recipe",
) -> list[Path]:
    """report.md, report.json and the plots in `out` (with `scoring="rasa"` also each model's results file in
    `rasa test du`'s YAML layout); returns the files written."""
    from recipe.yamlio import dump_yaml

    out.mkdir(parents=True, exist_ok=True)
    rasa_files = []
    if scoring == "rasa":
        for result in results:
            rasa_files.append(out / rasa_report_name(result.label))
            write_atomic(rasa_files[-1], dump_yaml(result.metrics["rasa"]))
    data = {
        "inputs": list(inputs),
        "cases": len(cases),
        "case_sources": dict(Counter(case.source for case in cases)),
        "left_out": left_out.as_dict(),
        "models": [{key: value for key, value in vars(result).items()} for result in results],
    }
    write_json(out / REPORT_JSON, data)
    written = [out / REPORT_JSON]
    written += plot_f1(out / F1_PNG, results)
    written += plot_latency(out / LATENCY_PNG, results)
    write_atomic(
        out / REPORT_MD,
        report_markdown(results, inputs, cases, [p.name for p in written if p.suffix == ".png"], left_out),
    )
    return [out / REPORT_MD, *written, *rasa_files]


def percent(value: float | None) -> str:
    """A share as the report and the console show it: 46.7%, or a dash when there is none."""
    return "—" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _summary_rows(results: Sequence[ModelResult]) -> list[list[str]]:
    def row(name: str, cell: Callable[[dict[str, Any]], str]) -> list[str]:
        return [name, *(cell(r.metrics) for r in results)]

    return [
        row("turn accuracy", lambda m: f"{percent(m['turn_accuracy'])} ({m['correct_turns']}/{m['turns']})"),
        row(
            "test case accuracy",
            lambda m: f"{percent(m['test_case_accuracy'])} ({m['correct_test_cases']}/{m['test_cases']})",
        ),
        row("user utterance accuracy, as `rasa test du`", lambda m: _rasa_accuracy(m, "user_utterances")),
        row("test case accuracy, as `rasa test du`", lambda m: _rasa_accuracy(m, "test_cases")),
        row("empty answers", lambda m: f"{percent(m['empty_rate'])} ({m['empty_turns']})"),
        row("unparseable answers", lambda m: f"{percent(m['unparseable_rate'])} ({m['unparseable_turns']})"),
        row(
            "invalid commands",
            lambda m: f"{percent(m['invalid_command_rate'])} ({m['invalid_commands']}/{m['emitted_commands']})",
        ),
        row("hallucinated flows", lambda m: str(m["hallucinated_flows"])),
        row("truncated answers", lambda m: str(m["truncated_turns"])),
        row("failed calls", lambda m: str(m["errors"])),
        row("latency p50 / p95", lambda m: f"{_number(m['latency']['p50_s'])} s / {_number(m['latency']['p95_s'])} s"),
        row("tokens per second", lambda m: _number(m["latency"]["tokens_per_second"], 1)),
        row("overhead p50 (render, parse, validate)", lambda m: f"{_number(m['latency']['overhead_p50_ms'], 2)} ms"),
    ]


def _rasa_accuracy(metrics: dict[str, Any], which: str) -> str:
    rasa = metrics["rasa"]
    passed, failed = (
        (rasa["number_of_passed_user_utterances"], rasa["number_of_failed_user_utterances"])
        if which == "user_utterances"
        else (rasa["number_of_passed_tests"], rasa["number_of_failed_tests"])
    )
    return f"{percent(rasa['accuracy'][which])} ({passed}/{passed + failed})"


def _rasa_section(results: Sequence[ModelResult]) -> str:
    labels = [r.label for r in results]
    text = (
        "\n## Per command type, as `rasa test du` counts\n\nRasa Pro's dialogue-understanding test report: steps "
        "with written commands only, payload and NLU turns included (answered by the runtime, not the model), "
        "commands the validator drops counted as predicted (false positives), an answer with nothing parsed as "
        "`cannot handle`, a command found when an equal one is anywhere in the other list. `--scoring rasa` writes "
        "the same numbers in its results-file layout.\n\n"
    )
    names = sorted({n for r in results for n in r.metrics["rasa"]["command_metrics"]})
    header = ["command", *(f"{label} {column}" for label in labels for column in ("TP/FP/FN", "P", "R", "F1"))]
    rows = []
    for name in names:
        row = [name]
        for result in results:
            c = result.metrics["rasa"]["command_metrics"].get(name)
            row += (
                [
                    f"{c['tp']}/{c['fp']}/{c['fn']}",
                    f"{c['precision']:.2f}",
                    f"{c['recall']:.2f}",
                    f"{c['f1_score']:.2f}",
                ]
                if c
                else ["—"] * 4
            )
        rows.append(row)
    return text + _table(header, rows)


def report_markdown(
    results: Sequence[ModelResult],
    inputs: Sequence[str],
    cases: Sequence[Case],
    plots: Sequence[str],
    left_out: LeftOut = _NONE_LEFT_OUT,
) -> str:
    labels = [r.label for r in results]
    parts = [f"# Command generator evaluation\n\n{len(cases)} turns from {', '.join(inputs)}.\n\n"]
    for line in filter(None, left_out.message().splitlines()):
        parts.append(f"**Not scored:** {line[0].upper()}{line[1:]}.\n\n")
    parts.append(
        _table(
            ["model", "what", "template (sha256)", "syntax", "constrained"],
            [
                [
                    r.label,
                    r.description,
                    f"{r.template} ({r.template_sha256[:12]})",
                    r.syntax,
                    "yes" if r.constrained else "no",
                ]
                for r in results
            ],
        )
    )
    for result in results:
        parts += [f"\n**Warning ({result.label}):** {warning}\n" for warning in result.warnings]
    parts.append("\n## Summary\n\n" + _table(["metric", *labels], _summary_rows(results)))
    parts.append(
        "\n## Per command type\n\nMatched per turn as multisets; `set slot (name only)` ignores values; a "
        "command the validator drops is not counted as predicted (it is under invalid commands), and payload "
        "turns are not scored. The next table counts as `rasa test du` does.\n\n"
    )
    kinds = sorted({k for r in results for k in r.metrics["per_command"]}, key=lambda k: (k == NAME_ONLY, k))
    header = ["command", *(f"{label} {column}" for label in labels for column in ("TP/FP/FN", "P", "R", "F1"))]
    rows = []
    for kind in kinds:
        row = [_command_name(kind, results)]
        for result in results:
            c = result.metrics["per_command"].get(kind)
            row += (
                [
                    f"{c['tp']}/{c['fp']}/{c['fn']}",
                    _number(c["precision"], 2),
                    _number(c["recall"], 2),
                    _number(c["f1"], 2),
                ]
                if c
                else ["—"] * 4
            )
        rows.append(row)
    parts.append(_table(header, rows))
    parts.append(_rasa_section(results))
    flows = sorted({f for r in results for f in r.metrics["per_flow"]})
    parts.append("\n## Per flow\n\nA turn belongs to the flow it starts, else to the flow in progress.\n\n")
    parts.append(
        _table(
            ["flow", *labels],
            [[flow, *(_flow_cell(r.metrics["per_flow"].get(flow)) for r in results)] for flow in flows],
        )
    )
    parts += [f"\n![{name}]({name})\n" for name in plots]
    for result in results:
        parts.append(f"\n## Worst turns: {result.label}\n")
        if not result.metrics["worst_turns"]:
            parts.append("\nEvery turn is correct.\n")
        for turn in result.metrics["worst_turns"]:
            parts.append(_worst_turn_markdown(turn))
    return "".join(parts)


def _command_name(kind: str, results: Sequence[ModelResult]) -> str:
    """The command's words in the models' syntax (`provide info` in v2, not the internal `knowledge`)."""
    from recipe.coverage import command_label

    syntaxes = {result.syntax for result in results}
    if len(syntaxes) != 1 or kind == NAME_ONLY:
        return kind
    try:
        return command_label(kind, Syntax(syntaxes.pop()))
    except ValueError:
        return kind


def _flow_cell(entry: dict[str, Any] | None) -> str:
    return "—" if entry is None else f"{percent(entry['accuracy'])} ({entry['correct']}/{entry['turns']})"


def _worst_turn_markdown(turn: dict[str, Any]) -> str:
    dropped = "".join(f"\n  - `{d['item']}`: {d['reason']}" for d in turn["dropped"])
    lines = [
        f"\n### {turn['id']}\n",
        f"- user: {turn['user_message']!r}",
        f"- expected: `{turn['expected'] or '(nothing)'}`".replace("\n", "; "),
        f"- predicted: `{turn['predicted'] or '(nothing)'}`".replace("\n", "; "),
        f"- raw answer: {json.dumps(turn['raw_answer'], ensure_ascii=False)}",
    ]
    if dropped:
        lines.append(f"- dropped:{dropped}")
    if turn["error"]:
        lines.append(f"- error: {turn['error']}")
    prompt = turn["prompt"] or ""
    fence = "````" if "```" in prompt else "```"
    lines.append(f"\n<details><summary>prompt</summary>\n\n{fence}\n{prompt}\n{fence}\n</details>\n")
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_f1(path: Path, results: Sequence[ModelResult]) -> list[Path]:
    """Grouped bars: F1 per command type, one bar per model."""
    kinds = sorted({k for r in results for k in r.metrics["per_command"]}, key=lambda k: (k == NAME_ONLY, k))
    if not kinds:
        return []
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(kinds) * max(1, len(results)) ** 0.5), 4.4))
    width = 0.8 / len(results)
    for index, result in enumerate(results):
        values = [(result.metrics["per_command"].get(k) or {}).get("f1") or 0.0 for k in kinds]
        positions = [i + index * width for i in range(len(kinds))]
        bars = axes.bar(positions, values, width, label=result.label)
        for position, value, bar in zip(positions, values, bars):
            # a zero bar has no height: write the 0 where it would be, in the bar's colour, so it is seen
            axes.text(
                position,
                value + 0.01,
                f"{value:.2f}" if value else "0",
                ha="center",
                va="bottom",
                fontsize=7,
                color=bar.get_facecolor() if not value else "black",
                fontweight="bold" if not value else None,
            )
    axes.set_xticks(
        [i + width * (len(results) - 1) / 2 for i in range(len(kinds))],
        [_command_name(kind, results) for kind in kinds],
        rotation=30,
        ha="right",
    )
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("F1")
    axes.set_title(
        "F1 per command type" + (f": {results[0].label}" if len(results) == 1 else ""),
        pad=22 if len(results) > 1 else 6,
    )
    if len(results) > 1:  # above the plot, where it covers no bar
        axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(results), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]


def plot_latency(path: Path, results: Sequence[ModelResult]) -> list[Path]:
    """Histogram of per-turn model latency, one series per model."""
    series = {r.label: r.metrics["latency"]["per_turn_s"] for r in results}
    if not any(series.values()):
        return []
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 4.0))
    for label, values in series.items():
        if values:
            axes.hist(values, bins=20, alpha=0.6, label=label)
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("latency per turn (s)")
    axes.set_ylabel("turns")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of turns: no 0.5 ticks
    axes.set_title(
        "Model call latency" + (f": {next(iter(series))}" if len(series) == 1 else ""), pad=22 if len(series) > 1 else 6
    )
    if len(series) > 1:
        axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(series), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]
