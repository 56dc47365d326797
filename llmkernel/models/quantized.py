"""Quantized model folders: an HF folder whose Linear layers hold integers, loaded as a read.

`llmk quantize` writes, beside the usual config.json and tokenizer files:

* `quantization.json`: `{"format": 1, "method": "int8" | "weight_only", "modules": [names], ...}` with
  `static` (int8: activation scales fixed by calibration) or `bits` and `group_size` (weight-only);
* `model.safetensors`: the model's state dict with each quantized Linear's buffers as the kernel reads
  them (`models.int8.Int8Linear`: int8 weights and per-channel scales; `models.weight_only.WeightOnlyLinear`:
  packed int4/int8 groups), so loading builds the model, swaps in empty quantized shells and reads the
  tensors; nothing is re-quantized at load.

The output embeddings are saved untied (`tie_word_embeddings: false`): a quantized head is its own tensor
while the input embedding stays in floating point for the lookup. Plain `transformers` cannot read such a
folder (it does not know these modules); every stage of ours can, through `models.loading.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUANTIZATION_FILE = "quantization.json"
FORMAT = 1


def is_quantized(folder: str | Path) -> bool:
    return (Path(folder) / QUANTIZATION_FILE).is_file()


def read_spec(folder: str | Path) -> dict[str, Any]:
    from llmkernel.errors import InputError

    path = Path(folder) / QUANTIZATION_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the quantization settings ({error})") from None
    if not isinstance(spec, dict) or spec.get("method") not in ("int8", "weight_only"):
        raise InputError(
            f"{path}: not a quantization.json written by llmk quantize (method int8 or weight_only)"
        )
    if spec.get("format", FORMAT) > FORMAT:
        raise InputError(f"{path}: written by a newer llmk (format {spec['format']}); upgrade llmkernel")
    return spec


def prepare(model, spec: dict[str, Any]) -> None:
    """Swap the Linear layers `spec` names for empty quantized shells of the right shapes."""
    if spec["method"] == "int8":
        from llmkernel.models.int8 import prepare_int8

        prepare_int8(model, spec["modules"], static=bool(spec.get("static")))
    else:
        from llmkernel.models.weight_only import prepare_weight_only

        prepare_weight_only(model, spec["modules"], bits=int(spec["bits"]), group_size=spec.get("group_size"))


def save_quantized(model, tokenizer, folder: str | Path, spec: dict[str, Any]) -> None:
    """Write a quantized `model` (its Linear layers already swapped) into the (staging) `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.config.tie_word_embeddings = False  # the quantized head is its own tensor (see above)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / QUANTIZATION_FILE).write_text(json.dumps({"format": FORMAT, **spec}, indent=2) + "\n")
    tokenizer.save_pretrained(folder)


def load_quantized(folder: str | Path, auto_class):
    """The quantized model in `folder` (an `AutoModelFor...` class builds it from config.json)."""
    import torch
    from safetensors.torch import load_file

    from llmkernel.errors import InputError

    spec = read_spec(folder)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    config.tie_word_embeddings = False
    model = auto_class.from_config(config, dtype=torch.float32)
    prepare(model, spec)
    weights = Path(folder) / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (OSError, ValueError) as error:
        raise InputError(f"{weights}: cannot read the quantized weights ({error})") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{folder}: the quantized weights do not match {QUANTIZATION_FILE} "
            f"({len(result.missing_keys)} missing, e.g. {sorted(result.missing_keys)[:2]}; "
            f"{len(result.unexpected_keys)} unexpected, e.g. {sorted(result.unexpected_keys)[:2]}); quantize again"
        )
    return model.eval()
