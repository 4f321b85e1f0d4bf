"""`recipe finetune`: LoRA-finetune a command-generator LLM on prepare-data's rows.

    from recipe.finetune import FinetuneConfig, finetune, generate_completions

    result = finetune(FinetuneConfig.from_sources("finetune/config.yaml", {"data": "...", "output_dir": "..."}))
    answers = generate_completions(result.local_dir, [prompt])

The recipe itself is `train.py`; `config.py`, `data.py`, `model.py`, `report.py`, `upload.py`, `throughput.py` and
`generate.py` are its building blocks. Importing this package does not import torch.
"""

from recipe.finetune.config import FinetuneConfig
from recipe.finetune.generate import generate_completions, load_finetuned
from recipe.finetune.train import FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "generate_completions", "load_finetuned"]
