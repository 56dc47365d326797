"""ONNX export of tiny BERT classifiers, NER models and encoders (and, as e2e, a tiny Llama decoder), checked in
onnxruntime at batch 1, 2 and 7 and lengths 5, 64 and 128 against PyTorch; unsupported models refused."""

from __future__ import annotations

import warnings

import pytest

from llmkernel.models.loading import load_model, load_tokenizer_for

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript (the onnx extra)")

from llmkernel.compress.onnx import (  # noqa: E402  (after the skips)
    CHECK_SHAPES,
    UnsupportedModelError,
    check_onnx,
    export_onnx,
)

LIMIT = 1e-4  # the bound on the largest absolute difference in fp32


def _export_and_check(folder, kind: str, out_file, with_tokenizer: bool = True) -> dict:
    model = load_model(folder, kind).eval()
    tokenizer = load_tokenizer_for(folder) if with_tokenizer else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tokenizer, out_file, kind=kind)
        check = check_onnx(model, out_file, vocab_size=model.config.vocab_size, repeats=1)
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]
    return check


TWO_INPUTS = ["input_ids", "attention_mask"]  # the tiny BERTs' tokenizer makes no token_type_ids
THREE_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]  # no tokenizer: all the model takes


@pytest.mark.parametrize(
    ("fixture", "kind", "output", "with_tokenizer", "inputs"),
    [
        ("bert_folder", "classifier", "logits", True, TWO_INPUTS),
        ("ner_folder", "token_classifier", "logits", True, TWO_INPUTS),
        ("bert_folder", "encoder", "last_hidden_state", False, THREE_INPUTS),
    ],
)
def test_export_matches_pytorch_at_every_shape(
    request, tmp_path, one_thread, fixture, kind, output, with_tokenizer, inputs
):
    out_file = tmp_path / "model.onnx"
    check = _export_and_check(request.getfixturevalue(fixture), kind, out_file, with_tokenizer)

    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left behind
    session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == inputs
    assert all(i.shape == ["batch", "sequence"] for i in session.get_inputs())  # both axes dynamic
    assert [o.name for o in session.get_outputs()] == [output]
    assert check["shapes"] == [list(shape) for shape in CHECK_SHAPES]
    assert check["max_abs_diff"] <= LIMIT, check["per_shape"]
    assert set(check["onnxruntime_ms"]) == set(check["torch_ms"]) == {"1x5", "2x64", "7x128"}


@pytest.mark.e2e
def test_decoder_without_kv_cache(llama_folder, tmp_path, one_thread):
    check = _export_and_check(llama_folder, "decoder", tmp_path / "model.onnx")
    assert check["max_abs_diff"] <= LIMIT, check["per_shape"]


def test_unsupported_models_are_refused(bert_folder, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    classifier = load_model(bert_folder, "classifier")
    with pytest.raises(ValueError, match="not a decoder model"):
        export_onnx(classifier, None, tmp_path / "a.onnx", kind="decoder")
    with pytest.raises(UnsupportedModelError, match="not a seq2seq model"):
        export_onnx(classifier, None, tmp_path / "a.onnx", kind="seq2seq")
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        export_onnx(t5, None, tmp_path / "a.onnx", kind="encoder")
    assert not list(tmp_path.iterdir())
