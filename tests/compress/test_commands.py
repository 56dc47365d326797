"""`llmk quantize`, `llmk prune`, `llmk distill` and `llmk export` on tiny models: the folders they write,
compress.json, loading the result with the stages that read it, and the bad inputs they refuse."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from llmkernel.compress.config import DistillConfig, ExportConfig, PruneConfig, QuantizeConfig
from llmkernel.compress.distill import distill
from llmkernel.compress.export import export
from llmkernel.compress.prune import prune
from llmkernel.compress.quantize import quantize
from llmkernel.config import build
from llmkernel.errors import ConfigError, InputError
from llmkernel.models.loading import load_model
from llmkernel.train.config import FinetuneConfig
from llmkernel.train.finetune import finetune
from tests.conftest import run_llmk
from tests.tiny_models import make_tiny_bert
from tests.train.test_finetune import _classify_rows, _write_tsv

MEASURE = {"batch_size": 4, "seq_len": 16, "repeats": 1, "decode_tokens": 6}


@pytest.fixture(scope="module")
def classify_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_data")
    return _write_tsv(root / "train.tsv", _classify_rows(160, 0)), _write_tsv(
        root / "dev.tsv", _classify_rows(48, 1)
    )


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, classify_files):
    """A tiny BERT fine-tuned to classify the keyword sentences (3 labels)."""
    root = tmp_path_factory.mktemp("compress_classifier")
    base = make_tiny_bert(root / "base", "model")
    train, dev = classify_files
    config = build(
        FinetuneConfig,
        {
            "task": "classify",
            "model": str(base),
            "out": str(root / "tuned"),
            "epochs": 3,
            "data": {"train": train, "eval": dev},
            "train": {"batch_size": 16, "threads": 1},
            "optim": {"lr": 1e-2},
            "progress": False,
        },
    )
    finetune(config)
    return root / "tuned"


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_quantize_int8_classifier_writes_a_folder_every_stage_loads(classifier, classify_files, tmp_path):
    before = _snapshot(classifier)
    out = tmp_path / "int8"
    config = build(
        QuantizeConfig,
        {
            "model": str(classifier),
            "out": str(out),
            "measure": {**MEASURE, "eval": classify_files[1]},
            "progress": False,
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        metrics = quantize(config)
    document = json.loads((out / "compress.json").read_text())
    assert document["stage"] == "quantize" and document["method"]["method"] == "int8"
    assert document["comparison"]["linear_bytes_ratio"] < 0.5  # int8 + scales, fp32 head kept
    assert "accuracy" in document["result"]["metrics"] and "metric_drop" in metrics
    assert (out / "run.json").is_file() and (out / "quantization.json").is_file()
    model = load_model(out, "classifier")
    from llmkernel.models.int8 import Int8Linear

    assert any(isinstance(m, Int8Linear) for m in model.modules())
    assert _snapshot(classifier) == before  # the source folder untouched
    # the same run again is up to date
    assert quantize(config) == json.loads((out / "run.json").read_text())["metrics"]


def test_evaluate_reads_a_quantized_folder(classifier, classify_files, tmp_path):
    out = tmp_path / "int8"
    quantize(
        build(
            QuantizeConfig, {"model": str(classifier), "out": str(out), "measure": MEASURE, "progress": False}
        )
    )
    result = run_llmk(
        "evaluate",
        str(out),
        "--data",
        classify_files[1],
        "--out",
        str(tmp_path / "ev"),
        "--progress",
        "false",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["accuracy"] > 0.3


def test_quantize_refuses_what_does_not_fit(classifier, llama_folder, tmp_path):
    with pytest.raises(InputError, match="int4 is weight-only for decoders"):
        quantize(
            build(QuantizeConfig, {"model": str(classifier), "mode": "int4", "out": str(tmp_path / "q")})
        )
    with pytest.raises(ConfigError, match="group_size"):
        build(QuantizeConfig, {"model": str(llama_folder), "group_size": 48})
    with pytest.raises(ConfigError, match="source model's folder"):
        quantize(build(QuantizeConfig, {"model": str(classifier), "out": str(classifier)}))
    assert not (tmp_path / "q").exists()


def test_quantize_int4_decoder_and_the_gates(llama_folder, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("Hello world, the quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "int4"
    config = build(
        QuantizeConfig,
        {
            "model": str(llama_folder),
            "mode": "int4",
            "group_size": 32,
            "out": str(out),
            "measure": {**MEASURE, "eval": str(text)},
            "progress": False,
        },
    )
    quantize(config)
    document = json.loads((out / "compress.json").read_text())
    comparison = document["comparison"]
    assert {"greedy_agreement", "max_logit_error", "metric_drop", "speedup"} <= set(comparison)
    assert document["gates"][0]["name"] == "perplexity increase"
    assert "perplexity" in document["result"]["metrics"]
    model = load_model(out, "decoder")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_prune_structured_gives_a_plain_transformers_folder(classifier, classify_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "pruned"
    config = build(
        PruneConfig,
        {
            "model": str(classifier),
            "out": str(out),
            "ffn": 0.5,
            "layers": 1,
            "calibration": classify_files[0],
            "calibration_samples": 32,
            "measure": {**MEASURE, "eval": classify_files[1]},
            "progress": False,
        },
    )
    prune(config)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 32
    document = json.loads((out / "compress.json").read_text())
    assert document["comparison"]["parameters_ratio"] < 1


def test_prune_unstructured_with_recovery_keeps_the_zeros(classifier, classify_files, tmp_path):
    out = tmp_path / "sparse"
    config = build(
        PruneConfig,
        {
            "model": str(classifier),
            "out": str(out),
            "method": "unstructured",
            "sparsity": 0.5,
            "calibration_samples": 32,
            "recover": {
                "steps": 6,
                "data": {"train": classify_files[0], "eval": classify_files[1]},
                "train": {"batch_size": 16, "threads": 1},
            },
            "measure": MEASURE,
            "progress": False,
        },
    )
    prune(config)
    model = load_model(out, "classifier")
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    assert abs(float((weight == 0).float().mean()) - 0.5) < 0.02
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stage"] == "prune" and (out / "compress.json").is_file()
    assert not any(p.name.endswith(".pruned") for p in tmp_path.iterdir())


def test_prune_bad_input(classifier, tmp_path):
    with pytest.raises(ConfigError, match="sparsity"):
        build(PruneConfig, {"model": str(classifier), "method": "unstructured", "sparsity": 1.0})
    with pytest.raises(ConfigError, match="--ffn, --heads or --layers"):
        build(PruneConfig, {"model": str(classifier)})
    with pytest.raises(InputError, match="calibration"):
        prune(build(PruneConfig, {"model": str(classifier), "ffn": 0.5, "out": str(tmp_path / "p")}))


def test_distill_a_one_layer_student(classifier, classify_files, tmp_path):
    student = tmp_path / "student"
    prune(
        build(
            PruneConfig,
            {
                "model": str(classifier),
                "out": str(student),
                "layers": 1,
                "calibration": classify_files[0],
                "calibration_samples": 16,
                "measure": MEASURE,
                "progress": False,
            },
        )
    )
    out = tmp_path / "distilled"
    train, dev = classify_files
    config = build(
        DistillConfig,
        {
            "task": "classify",
            "teacher": str(classifier),
            "student": str(student),
            "out": str(out),
            "epochs": 2,
            "data": {"train": train, "eval": dev},
            "train": {"batch_size": 16, "threads": 1},
            "optim": {"lr": 5e-3},
            "measure": MEASURE,
            "progress": False,
        },
    )
    metrics = distill(config)
    assert metrics["eval_accuracy"] > 0.5
    document = json.loads((out / "compress.json").read_text())
    assert document["stage"] == "distill" and document["comparison"]["speedup"] > 0
    assert json.loads((out / "run.json").read_text())["stage"] == "distill"


def test_distill_refuses_another_tokenizer(classifier, classify_files, llama_folder, tmp_path):
    config = build(
        DistillConfig,
        {
            "task": "classify",
            "teacher": str(classifier),
            "student": str(llama_folder),
            "data": {"train": classify_files[0]},
        },
    )
    with pytest.raises(InputError, match="one kind|tokenizer"):
        distill(config)


def test_export_safetensors_f16_and_refusals(classifier, tmp_path):
    out = tmp_path / "f16"
    export(build(ExportConfig, {"model": str(classifier), "out": str(out), "dtype": "f16"}))
    model = load_model(out, "classifier", dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    with pytest.raises(InputError, match="GGUF export takes Llama-style decoders"):
        export(build(ExportConfig, {"model": str(classifier), "out": str(tmp_path / "g"), "format": "gguf"}))
    with pytest.raises(ConfigError, match="dtype"):
        build(ExportConfig, {"model": str(classifier), "format": "onnx", "dtype": "q4_0"})


def test_cli_bad_sparsity_is_one_line_exit_2(classifier, tmp_path):
    result = run_llmk(
        "prune",
        str(classifier),
        "--method",
        "unstructured",
        "--sparsity",
        "1.5",
        "--out",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2
    assert "sparsity" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_quantized_folders_through_the_cli_are_served_as_stored(classifier, llama_folder, tmp_path):
    """`llmk quantize` from the CLI, then `llmk serve`'s app on each result: the decoder's engine runs the
    packed int4 weights (no re-quantizing at load) and greedy text equals the quantized model's own."""
    from llmkernel.models.loading import load_tokenizer_for
    from llmkernel.models.weight_only import WeightOnlyLinear
    from tests.serve.conftest import running_client

    for model, out, mode in (
        (llama_folder, tmp_path / "int4", "int4"),
        (classifier, tmp_path / "int8", "int8"),
    ):
        result = run_llmk("quantize", str(model), "--mode", mode, "--out", str(out), "--measure.repeats", "1")
        assert result.returncode == 0, result.stderr
        assert "written to" in result.stdout
    with running_client(tmp_path / "int4") as client:
        response = client.post(
            "/v1/completions", json={"prompt": "Hello world", "max_tokens": 8, "temperature": 0}
        )
        assert response.status_code == 200, response.text
        served = response.json()["choices"][0]["text"]
    model = load_model(tmp_path / "int4", "decoder")
    assert any(isinstance(m, WeightOnlyLinear) for m in model.modules())
    tokenizer = load_tokenizer_for(tmp_path / "int4")
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert served == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)[: len(served)]
    with running_client(tmp_path / "int8") as client:
        response = client.post("/v1/classify", json={"input": ["hello paris", "call me"]})
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 2
