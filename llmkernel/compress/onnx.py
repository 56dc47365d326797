"""`llmk export --format onnx`: encoders, classifiers, NER models and decoders (without KV cache) as ONNX.

The export uses PyTorch's supported exporter, `torch.onnx.export(..., dynamo=True)` (torch.export, then
onnxscript's translation and optimizer; the TorchScript exporter is deprecated in torch 2.13). The graph
takes `input_ids` and `attention_mask` (and `token_type_ids` when both the model and its tokenizer use them),
int64 of shape [batch, sequence] with both axes dynamic, and returns `logits` (`last_hidden_state` for a bare
encoder). `check_onnx` runs the file in onnxruntime at several shapes, with random tokens and right-padded
attention masks, against the PyTorch model: the largest absolute difference and both latencies.
"""

from __future__ import annotations

import inspect
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from llmkernel.errors import InputError, first_line

# kind (as models.loading.model_kind names it) -> the output the graph returns
ONNX_OUTPUTS = {
    "classifier": "logits",
    "token_classifier": "logits",
    "masked_lm": "logits",
    "encoder": "last_hidden_state",
    "decoder": "logits",
}
CHECK_SHAPES = ((1, 5), (2, 64), (7, 128))
PROTOBUF_LIMIT = 2**31  # one ONNX file holds at most 2 GB (larger models need external data files)
EXAMPLE_SHAPE = (2, 8)  # the traced example; sizes 0 and 1 would be specialised by torch.export


class UnsupportedModelError(InputError, ValueError):
    """A model this exporter cannot write (`llmk` prints it on one line; callers may catch ValueError)."""


def _wrap(model, input_names: list[str], output: str):
    """An nn.Module whose forward takes the `input_names` tensors positionally and returns `output`."""
    import torch

    # decoders: no KV cache in or out, so the graph is one full forward over [batch, sequence]
    extra = {"use_cache": False} if "use_cache" in _parameters(model) else {}

    class OnnxForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            inputs = dict(zip(input_names, tensors, strict=True))
            return getattr(self.model(**inputs, **extra, return_dict=True), output)

    return OnnxForward().eval()


def _parameters(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def input_names(model, tokenizer) -> list[str]:
    """input_ids, attention_mask, and token_type_ids when the model takes them and the tokenizer makes them."""
    names = ["input_ids", "attention_mask"]
    made = getattr(tokenizer, "model_input_names", None) or ["token_type_ids"]
    if "token_type_ids" in _parameters(model) and "token_type_ids" in made:
        names.append("token_type_ids")
    return names


def _check_supported(model, kind: str) -> None:
    from llmkernel.models.loading import architecture_kind

    if kind not in ONNX_OUTPUTS:
        raise UnsupportedModelError(
            f"ONNX export takes encoders, classifiers, NER models and decoders, not a {kind} model"
        )
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"ONNX export does not support {type(model).__name__} (encoder-decoder or not a transformers model)"
        )
    if architecture_kind(type(model).__name__) != kind:
        raise UnsupportedModelError(
            f"a {type(model).__name__} is not a {kind} model; export it with the kind its config.json names"
        )
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= PROTOBUF_LIMIT:
        raise UnsupportedModelError(
            f"the model holds {size / 2**30:.1f} GiB of weights; one ONNX file holds at most 2 GiB"
        )


def _example_inputs(names: list[str], vocab_size: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    batch, length = EXAMPLE_SHAPE
    tensors = {
        "input_ids": torch.randint(0, vocab_size, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
    }
    tensors["attention_mask"][1, length // 2 :] = 0  # a padded row, so masking is traced as it runs
    return tuple(tensors[name] for name in names)


def export_onnx(model, tokenizer, out_file: Path, *, kind: str) -> None:
    """Write `model` (a transformers model of `kind`, see ONNX_OUTPUTS) to `out_file` as ONNX, atomically.

    Raises:
        UnsupportedModelError (a ValueError): a kind or model this exporter does not take, or one that
        torch.export cannot trace.
    """
    import torch

    _check_supported(model, kind)
    model.eval()
    names = input_names(model, tokenizer)
    output = ONNX_OUTPUTS[kind]
    axes = {0: "batch", 1: "sequence"}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_file.with_name(f".{out_file.name}.tmp")
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # torch 2.13's own exporter internals: a pytree deprecation it raises itself, and a note per
            # input that the shared "batch"/"sequence" axis names are merged (which is what we ask for).
            warnings.filterwarnings(
                "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
            )
            warnings.filterwarnings(
                "ignore", message=r"# The axis name: .* will not be used", category=UserWarning
            )
            program = torch.onnx.export(
                _wrap(model, names, output),
                _example_inputs(names, model.config.vocab_size),
                input_names=names,
                output_names=[output],
                dynamic_shapes=(tuple(axes for _ in names),),  # forward(*tensors): one varargs tuple
                dynamo=True,
                optimize=True,
                verbose=False,
            )
            program.save(str(temporary), external_data=False)
    except torch.onnx.errors.OnnxExporterError as error:  # what torch.export or the translation raise
        temporary.unlink(missing_ok=True)
        raise UnsupportedModelError(
            # the exporter's own message is a page of advice; the cause (torch.export's error) names the problem
            f"ONNX export of {type(model).__name__} failed in torch.onnx ({first_line(error.__cause__ or error)})"
        ) from error
    finally:
        registry_log.setLevel(level)
    os.replace(temporary, out_file)


# ------------------------------------------------------------------------------------------ check


def _batch(names: list[str], batch: int, length: int, vocab_size: int, seed: int) -> dict[str, Any]:
    """Random token ids and right-padded masks (row 0 full, the others random lengths >= 1), int64 numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[length], rng.integers(1, length + 1, size=batch - 1)])
    positions = np.arange(length)[None, :]
    tensors = {
        "input_ids": rng.integers(0, vocab_size, size=(batch, length), dtype=np.int64),
        "attention_mask": (positions < lengths[:, None]).astype(np.int64),
        # a second segment from a random point of each row, as a sentence pair would have
        "token_type_ids": (positions >= rng.integers(1, length + 1, size=(batch, 1))).astype(np.int64),
    }
    return {name: tensors[name] for name in names}


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations and onnxruntime's graph preparation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def check_onnx(
    model, out_file: Path, *, shapes=CHECK_SHAPES, vocab_size: int, repeats: int = 3
) -> dict[str, Any]:
    """Run `out_file` in onnxruntime and `model` in PyTorch on the same random batches of each (batch, length).

    Returns:
        {"max_abs_diff": largest |onnxruntime - torch| over all shapes and positions (padded ones included),
        "shapes": [[batch, length], ...], "per_shape": {"BxL": diff}, "onnxruntime_ms": {"BxL": median ms},
        "torch_ms": {"BxL": median ms}, "threads": n}.
    """
    import numpy as np
    import onnxruntime
    import torch

    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # the same CPU budget as PyTorch, for a fair latency comparison
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(out_file), options, providers=["CPUExecutionProvider"])
    names = [item.name for item in session.get_inputs()]
    output = session.get_outputs()[0].name
    forward = _wrap(model, names, output)
    result: dict[str, Any] = {
        "shapes": [],
        "per_shape": {},
        "onnxruntime_ms": {},
        "torch_ms": {},
        "threads": threads,
    }
    worst = 0.0
    for index, (batch, length) in enumerate(shapes):
        feed = _batch(names, batch, length, vocab_size, seed=index)
        tensors = [torch.from_numpy(feed[name]) for name in names]
        with torch.no_grad():
            expected = forward(*tensors).float().numpy()
        actual = session.run([output], feed)[0]
        if actual.shape != expected.shape:
            raise AssertionError(f"onnxruntime output {actual.shape} != PyTorch {expected.shape}")
        difference = float(np.abs(actual.astype(np.float32) - expected).max())
        key = f"{batch}x{length}"
        worst = max(worst, difference)
        result["shapes"].append([batch, length])
        result["per_shape"][key] = difference
        result["onnxruntime_ms"][key] = _median_ms(lambda feed=feed: session.run([output], feed), repeats)
        with torch.no_grad():
            result["torch_ms"][key] = _median_ms(lambda tensors=tensors: forward(*tensors), repeats)
    result["max_abs_diff"] = worst
    return result
