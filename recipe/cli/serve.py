"""`recipe serve`: an OpenAI-compatible server for a finetuned model, or the `vllm serve` command for production."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from recipe.cli._common import setup_logging

if TYPE_CHECKING:
    from recipe.serve import ServeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a finetuned model over an OpenAI-compatible API (or print the vllm serve command)",
        description="Serve a recipe finetune folder (merged model or adapter), an adapter folder, a model folder or "
        "a hub id at /v1/chat/completions, /v1/completions, /v1/models and /health, for CPUs and small GPUs. Binds "
        "127.0.0.1 unless --host says otherwise. For production throughput use vLLM: --print-vllm-command.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the model to serve")
    parser.add_argument("--base-model", metavar="PATH_OR_ID", help="base of an adapter (default: adapter_config.json)")
    parser.add_argument(
        "--variant",
        choices=["auto", "merged", "adapter"],
        default="auto",
        help="a recipe finetune folder's merged model or its adapter (default: merged when present)",
    )
    parser.add_argument("--name", help="the model name clients ask for (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require `Authorization: Bearer <key>` with the key read from this environment variable",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="weights precision (default: fp32 on CPU, the training precision on a GPU)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads per generation (default: torch's, all cores; 1 on a shared machine)"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-tokens-limit",
        type=int,
        default=512,
        help="most answer tokens a request may ask for (default: %(default)s)",
    )
    limits.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="answer tokens when a request names none (default: %(default)s)",
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=8192,
        help="longest prompt accepted, in tokens (default: %(default)s); /v1/models reports "
        "this plus --max-tokens-limit as max_model_len",
    )
    limits.add_argument(
        "--max-request-bytes",
        type=int,
        default=1_000_000,
        help="largest request body accepted, in bytes (default: %(default)s)",
    )
    limits.add_argument(
        "--max-pending", type=int, default=32, help="requests queued or running before 503 (default: %(default)s)"
    )
    grammar = parser.add_argument_group("constrained decoding")
    grammar.add_argument(
        "--project",
        type=Path,
        metavar="DIR",
        help="the assistant: enables structured_outputs with its command grammar's regex",
    )
    grammar.add_argument(
        "--constrained",
        action="store_true",
        help="constrain every answer to the assistant's command grammar (needs --project)",
    )
    grammar.add_argument(
        "--command-syntax",
        choices=["v1", "v2", "v3"],
        help="syntax of the grammar (default: the model's training info, else the project's)",
    )
    vllm = parser.add_argument_group("vLLM (production)")
    vllm.add_argument(
        "--print-vllm-command",
        action="store_true",
        help="print the `vllm serve` command for --model and exit (vLLM needs a CUDA GPU)",
    )
    vllm.add_argument(
        "--vllm-adapter",
        action="store_true",
        help="serve the base model with the adapter as a LoRA module even when a merged model exists",
    )
    vllm.add_argument("--max-lora-rank", type=int, help="vLLM --max-lora-rank (default: the adapter's rank)")
    vllm.add_argument(
        "--max-model-len",
        type=int,
        help="vLLM --max-model-len (default: the longest training row + 25%% + answer tokens, "
        "rounded up to 1024s; unlike the max_model_len of this server's /v1/models, which is "
        "--max-prompt-tokens + --max-tokens-limit)",
    )
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    from recipe.serve import ServeConfig, ServeLimits

    return ServeConfig(
        model=args.model,
        base_model=args.base_model,
        variant=args.variant,
        name=args.name,
        host=args.host,
        port=args.port,
        api_key_env=args.api_key_env,
        dtype=args.dtype,
        threads=args.threads,
        limits=ServeLimits(
            max_request_bytes=args.max_request_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens_limit,
            default_max_tokens=args.default_max_tokens,
            max_pending=args.max_pending,
        ),
        project=args.project,
        constrained=args.constrained,
        command_syntax=args.command_syntax,
        vllm_adapter=args.vllm_adapter,
        max_lora_rank=args.max_lora_rank,
        max_model_len=args.max_model_len,
    )


def run(args: argparse.Namespace) -> int:
    setup_logging()
    config = config_from_args(args)
    if args.print_vllm_command:
        from recipe.serve import format_command_line, vllm_command

        print(format_command_line(vllm_command(config)))
        return 0
    from recipe.serve import build_server, create_app, serve_forever

    server = build_server(config)
    print(
        f"serving {config.served_name} ({server.backend.source.describe()}) at http://{config.host}:{config.port}/v1 "
        "(Ctrl-C stops)"
    )
    serve_forever(create_app(server), config.host, config.port)
    return 0
