"""Loading the base model (transformers or Unsloth), checking that quantization really happened, adding LoRA, merging.

torch, transformers, peft and unsloth are imported inside the functions: Unsloth must be imported before the others
(it patches them), and only on its branch, so nothing here may import them at module level.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe.errors import ConfigError, RecipeError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from recipe.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)

# Largest share of the unquantized weight memory a quantized load may take: real 8-bit loads measure 0.5-0.65
# (embeddings stay 16-bit), real 4-bit loads 0.35-0.5, a silently ignored flag 1.0.
MAX_MEMORY_SHARE = {"8bit": 0.8, "4bit": 0.6}
# Share of the LoRA target layers that must be quantized layers (a few may be skipped on purpose, e.g. by
# Unsloth's dynamic quants); a silently ignored flag gives 0.
MIN_QUANTIZED_LAYER_SHARE = 0.9
QUANTIZED_LAYER_NAMES = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True outside distributed runs, and on rank 0 of one (set by torchrun / accelerate launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def fsdp_enabled() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def resolve_backend(requested: str) -> str:
    """auto: Unsloth on a single CUDA GPU with the [gpu] extra installed, else transformers + PEFT + TRL."""
    if requested == "hf":
        return "hf"
    usable = cuda_available() and unsloth_installed() and world_size() == 1
    if requested == "auto":
        return "unsloth" if usable else "hf"
    if not cuda_available():
        raise ConfigError("backend unsloth needs a CUDA GPU (Unsloth cannot train on CPU); use --backend hf or auto")
    if not unsloth_installed():
        raise ConfigError(
            "backend unsloth: Unsloth is not installed; pip install -c constraints/gpu.txt '.[train,gpu]'"
        )
    if world_size() > 1:
        raise ConfigError("backend unsloth runs on one GPU; under accelerate launch use --backend hf")
    return "unsloth"


def import_unsloth() -> None:
    """Import Unsloth before transformers/trl/peft are imported anywhere, so its patches apply."""
    import unsloth  # noqa: F401


def resolve_precision(precision: str) -> str:
    """auto: bf16 on GPUs that have it (A100, L4), fp16 on those that do not (T4), fp32 on CPU."""
    if precision != "auto":
        return precision
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype(precision: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_tokenizer(model_id: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model {model_id!r}: cannot load its tokenizer: {first_line(error)}") from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    """The bitsandbytes settings for a quantization, or None for a 16/32-bit load."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # FSDP shards the 4-bit weights only when they are stored in the compute dtype (QLoRA + FSDP).
        bnb_4bit_quant_storage=dtype if fsdp_enabled() else None,
    )


def device_map(quantization: str) -> dict[str, Any] | None:
    """Quantized weights are placed at load time: on this process's GPU (one copy per DDP process) or the CPU.

    Unquantized models and FSDP are left to the Trainer/accelerate, which place and shard them.
    """
    if quantization == "none" or fsdp_enabled():
        return None
    return {"": local_rank() if cuda_available() else "cpu"}


def load_hf_model(model_id: str, quantization: str, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if quantization == "8bit" and fsdp_enabled():
        raise ConfigError("FSDP cannot shard 8-bit weights; use --load-in-4bit or --no-quantization with FSDP")
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_id,
            dtype=dtype,
            quantization_config=bnb_config(quantization, dtype),
            device_map=device_map(quantization),
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"model {model_id!r}: cannot load it: {first_line(error)}") from error


def load_unsloth_model(
    model_id: str, quantization: str, dtype: torch.dtype, max_length: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from unsloth import FastLanguageModel

    # from_pretrained defaults to load_in_4bit=True: spell out both flags.
    return FastLanguageModel.from_pretrained(
        model_name=model_id,
        max_seq_length=max_length,
        dtype=dtype,
        load_in_4bit=quantization == "4bit",
        load_in_8bit=quantization == "8bit",
        full_finetuning=False,
    )


@dataclass(frozen=True)
class QuantizationCheck:
    """What a load really produced, measured rather than taken from the flag."""

    requested: str
    quantized_layers: int
    target_layers: int
    weight_bytes: int
    unquantized_bytes: int

    @property
    def memory_share(self) -> float:
        return self.weight_bytes / self.unquantized_bytes

    @property
    def ok(self) -> bool:
        if self.requested == "none":
            return True
        layers_ok = self.quantized_layers >= MIN_QUANTIZED_LAYER_SHARE * self.target_layers
        return layers_ok and self.memory_share <= MAX_MEMORY_SHARE[self.requested]

    def describe(self) -> str:
        if self.requested == "none":
            return f"unquantized, weights {self.weight_bytes / 2**20:.1f} MiB"
        return (
            f"{self.quantized_layers} of {self.target_layers} LoRA target layers are "
            f"{QUANTIZED_LAYER_NAMES[self.requested]}, weights take {self.weight_bytes / 2**20:.1f} MiB = "
            f"{self.memory_share:.0%} of the unquantized {self.unquantized_bytes / 2**20:.1f} MiB "
            f"(expected <= {MAX_MEMORY_SHARE[self.requested]:.0%})"
        )


def target_layers(model: Any, target_modules: list[str]) -> list[tuple[str, Any]]:
    """The modules LoRA will wrap: those whose last name part is a target and that hold a 2-D weight."""
    layers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in target_modules and weight is not None and weight.dim() == 2:
            layers.append((name, module))
    return layers


def logical_numel(parameter: Any) -> int:
    """Number of weights a parameter stands for (a packed 4-bit tensor holds two per byte; its shape says so)."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        return int(quant_state.shape.numel())
    return parameter.numel()


def check_quantization(
    model: Any, quantization: str, target_modules: list[str], dtype: torch.dtype, cuda_bytes_loaded: int | None = None
) -> QuantizationCheck:
    """Count quantized layer types among the LoRA targets and measure the weights' memory.

    On a GPU the memory is what the load allocated on the device (catches a 16-bit copy kept aside); on CPU it is
    the bytes the parameters occupy. The reference is the same model in the compute dtype.
    """
    import torch

    layers = target_layers(model, target_modules)
    quantized_name = QUANTIZED_LAYER_NAMES.get(quantization)
    quantized = sum(1 for _, module in layers if type(module).__name__ == quantized_name)
    parameters = list(model.parameters())
    stored = sum(p.numel() * p.element_size() for p in parameters)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    unquantized = sum(logical_numel(p) for p in parameters) * itemsize
    measured = max(stored, cuda_bytes_loaded or 0)
    return QuantizationCheck(quantization, quantized, len(layers), measured, unquantized)


@dataclass
class BaseModel:
    """The loaded base model, the quantization that really took effect, and Unsloth's tokenizer on that path."""

    model: Any
    quantization: str
    check: QuantizationCheck
    tokenizer: Any | None = None


def load_base_model(config: FinetuneConfig, backend: str, dtype: torch.dtype, max_length: int) -> BaseModel:
    """Load with the requested quantization, verify it, and fall back (with a clear message) where it did not happen."""
    attempts: list[str] = [config.quantization]
    if config.quantization != "none" and config.quantization_fallback not in ("error", config.quantization):
        attempts.append(config.quantization_fallback)
    failures: list[str] = []
    for quantization in attempts:
        base = _load_and_check(config, backend, quantization, dtype, max_length)
        if base.check.ok:
            if failures:
                log.warning("loaded with %s instead: %s", quantization, base.check.describe())
            return base
        failure = f"{quantization} loading did not happen: {base.check.describe()}"
        failures.append(failure)
        log.warning("%s", failure)
        if quantization != attempts[-1]:
            log.warning("falling back to %s (set quantization_fallback: error to stop instead)", attempts[-1])
        del base
        release_memory()
    raise RecipeError("; ".join(failures) + " (see quantization_fallback in finetune/config.yaml)")


def _load_and_check(
    config: FinetuneConfig, backend: str, quantization: str, dtype: torch.dtype, max_length: int
) -> BaseModel:
    import torch

    on_cuda = torch.cuda.is_available()
    before = torch.cuda.memory_allocated() if on_cuda else 0
    tokenizer = None
    if backend == "unsloth":
        model, tokenizer = load_unsloth_model(config.model, quantization, dtype, max_length)
    else:
        model = load_hf_model(config.model, quantization, dtype)
    loaded = torch.cuda.memory_allocated() - before if on_cuda else None
    check = check_quantization(model, quantization, config.lora_target_modules, dtype, loaded)
    return BaseModel(model=model, quantization=quantization, check=check, tokenizer=tokenizer)


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_lora(base: BaseModel, config: FinetuneConfig, backend: str, max_length: int) -> Any:
    """Wrap the target projections with LoRA adapters; only the adapters train."""
    missing = [name for name in config.lora_target_modules if not target_layers(base.model, [name])]
    if missing:
        available = sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_layers(base.model)})
        raise ConfigError(
            f"lora_target_modules: {', '.join(missing)} not found in {config.model}; its linear layers are "
            f"{', '.join(available)}"
        )
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            base.model,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            bias="none",
            use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
            random_state=config.seed,
            max_seq_length=max_length,
        )
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    assert config.lora_dropout is not None  # train.prepare() resolves it (`resolved_lora_dropout`)

    model = base.model
    if base.quantization != "none":
        # Casts norms to fp32 and enables input gradients, which k-bit LoRA needs to train stably.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False  # the KV cache is useless in training and clashes with gradient checkpointing
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _linear_layers(model: Any) -> list[tuple[str, Any]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if getattr(module, "weight", None) is not None and module.weight.dim() == 2 and name
    ]


def merge_adapter(
    base_model: str, adapter_dir: Path, merged_dir: Path, dtype: torch.dtype, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Merge the adapter into an unquantized copy of the base (merging into 8/4-bit weights would lose precision)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    placement = "auto" if cuda_available() else None
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, device_map=placement)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    del base, merged
    release_memory()


def load_trained_model(
    model_dir: Path, base_model: str, quantization: str, dtype: torch.dtype, merged: bool
) -> PreTrainedModel:
    """The finetuned model for generation: the merged weights, or the base (as trained on a GPU) plus the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any  # a PreTrainedModel, or a PeftModel around one
    if merged:
        merged_dir = model_dir / "merged"
        if not merged_dir.is_dir():
            raise ConfigError(f"{model_dir}: no merged model (train with --merge)")
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype)
    else:
        # On CPU load the base unquantized: bitsandbytes' CPU kernels are slow and nothing needs the memory saving.
        model = load_hf_model(base_model, quantization if cuda_available() else "none", dtype)
        model = PeftModel.from_pretrained(model, str(model_dir))
    if cuda_available() and getattr(model, "hf_device_map", None) is None:
        model = model.to("cuda")  # quantized loads were placed already
    return model.eval()
