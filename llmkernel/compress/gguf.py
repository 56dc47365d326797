"""`llmk export --format gguf`: a Llama-style HF decoder folder as one GGUF file that llama.cpp runs.

What llama.cpp's own converter (`convert_hf_to_gguf.py`, class LlamaModel, vendored in llama-cpp-python
0.3.36) writes, and we mirror:

* tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`; `output` is
  left out when the embeddings are tied), with the q/k rows permuted from HF's rotate-half RoPE layout back
  to the interleaved pairs that llama.cpp's RoPE expects;
* the `llama.*` hyperparameters (context, width, blocks, FFN width, heads, KV heads, head size, RoPE base,
  RMSNorm epsilon, vocabulary size);
* the tokenizer as `tokenizer.ggml.*`: byte-level BPE is llama.cpp's "gpt2" model with tokens, token types
  (special added tokens are CONTROL), merges, bos/eos/pad/unk ids and a pre-tokenizer name whose regex is the
  one our tokenizer uses (see PRE_TOKENIZERS), plus the chat template.

Weight types: f32; f16 (matrices f16, norms f32); q8_0 and q4_0 with `gguf.quants.quantize` (norms and other
1-D tensors stay f32 as in llama.cpp, and a matrix whose rows are not a multiple of the 32-value block falls
back to f16). Under q4_0 the output projection (the embedding when tied) is Q8_0: llama.cpp's quantizer
also keeps that tensor at a higher precision (Q6_K, which gguf-py cannot write).

`check_gguf` loads the file in llama.cpp itself (llama-cpp-python) and compares its tokenization of a sample
text and its greedy continuation of a prompt with our tokenizer and our PyTorch model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmkernel.compress.onnx import UnsupportedModelError
from llmkernel.errors import InputError, first_line

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")

# HF module name inside `model.layers.N.` -> llama.cpp tensor name inside `blk.N.`
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# A tokenizers pre-tokenizer (as its tokenizer.json shape) -> llama.cpp's `tokenizer.ggml.pre` with the same
# split. "gpt-2" is llama.cpp's GPT-2 regex ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
# unicode_regex_split_custom_gpt2), which `pre_tokenizers.ByteLevel(use_regex=True)` also uses: the
# tokenizers `llmk prepare` trains. "smollm" splits digits one by one first (SmolLM2's tokenizer.json).
BYTE_LEVEL = ("ByteLevel", False, True)  # (type, add_prefix_space, use_regex)
PRE_TOKENIZERS = {
    (BYTE_LEVEL,): "gpt-2",
    (("Digits", True), BYTE_LEVEL): "smollm",
}

FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # gguf.LlamaFileType values


def _gguf():
    import gguf  # a dependency of the package (transformers reads .gguf files with it)

    return gguf


# ------------------------------------------------------------------------------------------ the config


def _llama_config(folder: Path) -> dict[str, Any]:
    """config.json of a Llama-style decoder; UnsupportedModelError for anything llama.cpp's "llama" can't run."""
    from llmkernel.models.loading import read_model_config
    from llmkernel.models.quantized import is_quantized

    config = read_model_config(folder)
    if is_quantized(folder):
        raise UnsupportedModelError(
            "the folder holds `llmk quantize` integer weights; export its source folder (GGUF quantizes itself)"
        )
    architecture = str((config.get("architectures") or [""])[0])
    if config.get("model_type") != "llama" or architecture != "LlamaForCausalLM":
        raise UnsupportedModelError(
            f"GGUF export needs a Llama-style decoder (LlamaForCausalLM), "
            f"not {architecture or config.get('model_type') or 'this model'}; use --format onnx for other models"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UnsupportedModelError("GGUF export of Llama models with bias terms is not supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedModelError(
            f"GGUF export supports plain RoPE only, not rope_type '{rope.get('rope_type')}'"
        )
    return config


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _write_hyperparameters(writer, config: dict[str, Any], dtype: str, name: str) -> None:
    heads = int(config["num_attention_heads"])
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_key_length(_head_dim(config))  # as llama.cpp's converter: needed when head_dim != width/heads
    writer.add_value_length(_head_dim(config))
    writer.add_file_type(FILE_TYPES[dtype])
    if dtype in ("q8_0", "q4_0"):
        writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


# ------------------------------------------------------------------------------------------ the tensors


def _read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or its shards) as float32 numpy arrays."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise InputError(f"{folder}: no model.safetensors; save the model with safe_serialization=True")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        for key, tensor in load_file(folder / name).items():
            tensors[key] = tensor.float().numpy()
    return tensors


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from HF's rotate-half layout to llama.cpp's interleaved RoPE pairs (`LlamaModel.permute`).

    HF keeps each head's rotary pairs as (first half, second half) of the head's rows; llama.cpp rotates
    adjacent rows (2i, 2i+1). Shapes: weight [heads * head_dim, width] -> the same shape.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_tensors(state_dict: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF Llama tensors under llama.cpp's names, q/k permuted; `output` dropped when embeddings are tied."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    tied = bool(config.get("tie_word_embeddings", False))
    out: dict[str, np.ndarray] = {}
    for key, tensor in state_dict.items():
        module, _, suffix = key.rpartition(".")
        if module.endswith("rotary_emb") or suffix == "inv_freq":
            continue  # recomputed from rope.freq_base
        if module.startswith("model.layers."):
            index, _, inner = module.removeprefix("model.layers.").partition(".")
            if inner not in BLOCK_TENSORS:
                raise UnsupportedModelError(f"GGUF export: unexpected Llama tensor {key}")
            if inner == "self_attn.q_proj":
                tensor = permute_rotary(tensor, heads)
            elif inner == "self_attn.k_proj":
                tensor = permute_rotary(tensor, kv_heads)
            out[f"blk.{index}.{BLOCK_TENSORS[inner]}.{suffix}"] = tensor
        elif module in TOP_TENSORS:
            if module == "lm_head" and tied:
                continue  # llama.cpp reuses token_embd
            out[f"{TOP_TENSORS[module]}.{suffix}"] = tensor
        else:
            raise UnsupportedModelError(f"GGUF export: unexpected Llama tensor {key}")
    return out


def _encode_tensor(name: str, tensor: np.ndarray, dtype: str, tied: bool):
    """(data, raw ggml type or None) of one tensor for GGUFWriter.add_tensor under `dtype`."""
    gguf = _gguf()
    if tensor.ndim < 2 or dtype == "f32":
        return tensor.astype(np.float32), None
    quant = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(dtype)
    block = 32  # Q8_0 and Q4_0 quantise rows in blocks of 32 values
    if quant is None or tensor.shape[-1] % block:
        return tensor.astype(np.float16), None
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if dtype == "q4_0" and is_output:
        quant = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(tensor.astype(np.float32), quant), quant


# ------------------------------------------------------------------------------------------ the tokenizer


def _pre_tokenizer_shape(pre: dict | None) -> tuple:
    """A tokenizer.json pre_tokenizer as a comparable tuple of its steps (see PRE_TOKENIZERS)."""
    steps = (pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]) if pre else []
    shape = []
    for step in steps:
        if step.get("type") == "ByteLevel":
            shape.append(("ByteLevel", bool(step.get("add_prefix_space")), bool(step.get("use_regex", True))))
        elif step.get("type") == "Digits":
            shape.append(("Digits", bool(step.get("individual_digits"))))
        else:
            shape.append((str(step.get("type")),))
    return tuple(shape)


def tokenizer_metadata(folder: Path, vocab_size: int) -> dict[str, Any]:
    """What `tokenizer.ggml.*` holds for the tokenizer of `folder` (raises for tokenizers llama.cpp can't match)."""
    from llmkernel.models.loading import load_tokenizer_for

    tokenizer = load_tokenizer_for(folder)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedModelError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style, as `llmk prepare` "
            f"trains), not a {model.get('type')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''}"
        )
    shape = _pre_tokenizer_shape(spec.get("pre_tokenizer"))
    if spec.get("normalizer") or shape not in PRE_TOKENIZERS:
        steps = " + ".join(step[0] for step in shape) or "none"
        normalizer = (spec.get("normalizer") or {}).get("type", "none")
        raise UnsupportedModelError(
            f"its tokenizer (pre-tokenizer {steps}, normalizer {normalizer}) has no llama.cpp equivalent; "
            "train a byte-level BPE with `llmk prepare --tokenizer.kind bpe`"
        )
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):  # the model's embedding rows may outnumber the tokenizer's tokens
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return {
        "pre": PRE_TOKENIZERS[shape],
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "add_eos": len(probe) > 1 and probe[-1] == tokenizer.eos_token_id,
        "chat_template": template,
    }


def _write_tokenizer(writer, metadata: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(metadata["pre"])
    writer.add_token_list(metadata["tokens"])
    writer.add_token_types(metadata["types"])
    writer.add_token_merges(metadata["merges"])
    special_ids = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for key, add in special_ids.items():
        if metadata[key] is not None:
            add(metadata[key])
    writer.add_add_bos_token(metadata["add_bos"])
    writer.add_add_eos_token(metadata["add_eos"])
    writer.add_add_space_prefix(False)
    if metadata["chat_template"]:
        writer.add_chat_template(metadata["chat_template"])


# ------------------------------------------------------------------------------------------ export


def export_gguf(model_folder: Path, out_file: Path, *, dtype: str) -> dict[str, Any]:
    """Write the Llama decoder in HF folder `model_folder` to the GGUF file `out_file` (atomically).

    Args:
        model_folder: a plain HF Llama folder (config.json, model.safetensors, tokenizer files).
        dtype: one of GGUF_TYPES.
    Returns:
        {"tensors": n, "bytes": file size, "tokenizer": "gpt2", "pre": llama.cpp pre-tokenizer, "types": {ggml
        type: count}}.
    Raises:
        UnsupportedModelError (a ValueError) for a non-Llama model or a tokenizer llama.cpp can't reproduce.
    """
    if dtype not in GGUF_TYPES:
        raise UnsupportedModelError(
            f"GGUF type '{dtype}' is not supported; choose one of {', '.join(GGUF_TYPES)}"
        )
    gguf = _gguf()
    model_folder, out_file = Path(model_folder), Path(out_file)
    config = _llama_config(model_folder)
    metadata = tokenizer_metadata(model_folder, int(config["vocab_size"]))
    tensors = gguf_tensors(_read_state_dict(model_folder), config)
    tied = bool(config.get("tie_word_embeddings", False))

    out_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_file.with_name(f".{out_file.name}.tmp")
    writer = gguf.GGUFWriter(temporary, arch="llama")
    counts: dict[str, int] = {}
    try:
        _write_hyperparameters(writer, config, dtype, model_folder.resolve().name)
        _write_tokenizer(writer, metadata)
        for name, tensor in tensors.items():
            data, raw_type = _encode_tensor(name, tensor, dtype, tied)
            writer.add_tensor(name, data, raw_dtype=raw_type)
            type_name = (
                raw_type.name
                if raw_type is not None
                else {np.float32: "F32", np.float16: "F16"}[data.dtype.type]
            )
            counts[type_name] = counts.get(type_name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)  # an interrupted export leaves no file behind
        raise
    writer.close()
    os.replace(temporary, out_file)
    return {
        "tensors": len(tensors),
        "bytes": out_file.stat().st_size,
        "tokenizer": "gpt2",
        "pre": metadata["pre"],
        "types": counts,
    }


# ------------------------------------------------------------------------------------------ check with llama.cpp


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def check_gguf(
    model_folder: Path,
    gguf_file: Path,
    *,
    sample_text: str,
    prompt: str,
    new_tokens: int = 32,
    threads: int = 2,
) -> dict[str, Any]:
    """Compare llama.cpp running `gguf_file` with our tokenizer and PyTorch model from `model_folder`.

    Checks: llama.cpp's vocabulary size and bos/eos ids equal ours; its tokenization of `sample_text` (special
    tokens parsed, bos added as the file says) equals our tokenizer's; `new_tokens` greedy tokens after
    `prompt` (llama.cpp: temperature 0, top-k 1, no repeat penalty, `threads` threads; ours: argmax with the KV
    cache) are equal, else `first_difference` is the first index where they part.
    """
    import llama_cpp  # the llamacpp extra: an ImportError names it to the caller

    from llmkernel.compress.measure import greedy
    from llmkernel.models.loading import load_model, load_tokenizer_for, read_model_config

    tokenizer = load_tokenizer_for(model_folder)
    prompt_ids = tokenizer(prompt)["input_ids"]
    try:
        llm = llama_cpp.Llama(
            model_path=str(gguf_file),
            n_ctx=len(prompt_ids) + new_tokens + 8,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as error:
        raise InputError(f"{gguf_file}: llama.cpp cannot load it ({first_line(error)})") from None
    try:
        ours = tokenizer(sample_text)["input_ids"]
        theirs = llm.tokenize(sample_text.encode("utf-8"), add_bos=True, special=True)
        vocab_equal = (llm.n_vocab(), llm.token_bos(), llm.token_eos()) == (
            int(read_model_config(model_folder)["vocab_size"]),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        )
        start = time.perf_counter()
        generator = llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        generated_llama = [next(generator) for _ in range(new_tokens)]
        llama_ms = (time.perf_counter() - start) * 1000
    finally:
        llm.close()

    model = load_model(model_folder, "decoder").eval()
    start = time.perf_counter()
    generated_ours, _ = greedy(model, prompt_ids, new_tokens)
    torch_ms = (time.perf_counter() - start) * 1000
    return {
        "vocab_equal": vocab_equal,
        "tokens_equal": ours == theirs,
        "sample_tokens": len(ours),
        "generation_equal": generated_ours == generated_llama,
        "first_difference": _first_difference(generated_ours, generated_llama),
        "ours": generated_ours,
        "llama_cpp": generated_llama,
        "ours_text": tokenizer.decode(generated_ours),
        "llama_cpp_text": tokenizer.decode(generated_llama),
        "llama_cpp_ms": round(llama_ms, 1),
        "torch_ms": round(torch_ms, 1),
    }
