from __future__ import annotations

import pytest
import torch

from llmkernel.config import build
from llmkernel.errors import ConfigError
from llmkernel.models.presets import ModelConfig, build_model, count_parameters, flops_per_token
from llmkernel.train.config import OptimConfig, PretrainConfig
from llmkernel.train.optim import build_optimizer, lr_multiplier


def test_schedules():
    cosine = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cosine) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cosine) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, cosine) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, cosine) == pytest.approx(0.1)
    wsd = OptimConfig(warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(50, 100, wsd) == 1.0
    assert lr_multiplier(90, 100, wsd) == pytest.approx(0.5)
    assert lr_multiplier(40, 100, OptimConfig(schedule="constant", warmup_steps=0)) == 1.0


def test_weight_decay_only_on_matrices():
    model = build_model(ModelConfig(size="tiny"), "decoder", 300, 64, {"eos": 0, "pad": 1})
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


def test_presets_and_flops():
    decoder = build_model(
        ModelConfig(size="tiny", layers=3, width=128, heads=4, kv_heads=2), "decoder", 512, 64, {}
    )
    config = decoder.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (3, 128, 2)
    assert config.intermediate_size == 320 and config.tie_word_embeddings
    counts = count_parameters(decoder)
    # tied head: counted as a matmul even though its weight is the input embedding
    assert flops_per_token(decoder, 64) == 6 * counts["total"] + 12 * 3 * 128 * 64
    encoder = build_model(ModelConfig(size="tiny"), "encoder", 512, 64, {"pad": 0})
    assert encoder.config.model_type == "bert" and encoder.config.num_attention_heads == 4
    with torch.no_grad():
        assert decoder(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 512)


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="model.kind: encoder does not fit objective clm"):
        build(PretrainConfig, {"model": {"kind": "encoder"}})
    with pytest.raises(ConfigError, match="train.batch_size: must be >= 1"):
        build(PretrainConfig, {"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="width"):
        ModelConfig(width=100, heads=3).resolved("decoder")


def test_compile_auto_only_where_it_pays():
    from llmkernel.train.compile import COMPILE_MIN_STEPS, compile_decision

    cpu = torch.device("cpu")
    assert compile_decision("true", cpu, 1, static_shapes=False)[0]
    assert "recompile" in compile_decision("true", cpu, 1, static_shapes=False)[1]  # says why it is slow
    assert not compile_decision("false", torch.device("cuda"), 10_000, static_shapes=True)[0]
    assert not compile_decision("auto", cpu, COMPILE_MIN_STEPS - 1, static_shapes=True)[0]
    assert not compile_decision("auto", cpu, 10_000, static_shapes=False)[0]
    assert compile_decision("auto", torch.device("cuda"), COMPILE_MIN_STEPS, static_shapes=True)[0]


def test_compile_setting_reads_old_boolean_configs():
    from llmkernel.errors import ConfigError
    from llmkernel.train.config import TrainConfig

    assert TrainConfig(compile=False).compile == "false"  # run.json written before "auto"
    assert TrainConfig(compile="True").compile == "true"
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="sometimes")
