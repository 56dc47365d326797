"""`llmk report` over real run folders: prepare, pretrain, finetune (classify and ner), evaluate with an
attack and quantize, each run on tiny inputs by the real stages; then the page's sections and numbers,
the Markdown twin, finding runs, user errors through the CLI, and the page in headless Chromium."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from llmkernel.compress.config import QuantizeConfig
from llmkernel.compress.quantize import quantize
from llmkernel.config import build
from llmkernel.data.config import PrepareConfig
from llmkernel.data.pipeline import prepare
from llmkernel.errors import ConfigError, InputError
from llmkernel.eval.config import EvaluateConfig
from llmkernel.eval.evaluate import evaluate
from llmkernel.report.build import build_sections, write_report
from llmkernel.report.collect import find_runs
from llmkernel.report.document import Table, cell
from llmkernel.report.samples import continuations
from llmkernel.train.config import FinetuneConfig, PretrainConfig
from llmkernel.train.finetune import finetune
from llmkernel.train.pretrain import pretrain
from tests.conftest import REPO, WORDS, run_llmk
from tests.tiny_models import make_tiny_bert
from tests.train.test_finetune import _classify_rows, _write_conll, _write_tsv

SECTIONS = ["data", "training", "evaluation", "compression", "generations", "configs"]
WITHOUT_PLOTS = {"generations"}  # text is what a sample is
CHINESE = "今天天气很好，我们一起去公园散步，然后在湖边的小店里喝茶聊天，直到太阳落山才回家。" * 3


def _corpus(folder: Path) -> None:
    """English documents, two exact copies, two with PII, two too short and two in Chinese."""
    rng = random.Random(0)
    folder.mkdir()
    texts = [" ".join(rng.choice(WORDS) for _ in range(120)).capitalize() + "." for _ in range(24)]
    texts += [texts[0], texts[1]]  # duplicates
    texts[2] += " Write to alice@example.com or call +44 20 7946 0958."
    texts[3] += " Mail bob@example.org today."
    texts += ["Too short.", "Also short."]
    texts += [CHINESE, CHINESE[::-1]]
    for index, text in enumerate(texts):
        (folder / f"doc{index:03d}.txt").write_text(text, encoding="utf-8")


def _prepare(root: Path) -> Path:
    _corpus(root / "corpus")
    rules = {"max_top_ngram_fraction": 1.0, "max_duplicate_ngram_fraction": 1.0}  # 40 words repeat a lot
    config = {
        "inputs": [str(root / "corpus")],
        "out": str(root / "runs" / "data"),
        "workers": 1,
        "progress": False,
        "dedup": {"near": False},
        "filter": {"min_chars": 40, **rules},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "pack": {"val_fraction": 0.2},
    }
    prepare(build(PrepareConfig, config))
    return root / "runs" / "data"


def _pretrain(data: Path, out: Path) -> None:
    train = {"batch_size": 4, "seq_len": 32, "max_steps": 8, "eval_every": 4, "checkpoint_every": 0}
    train |= {"log_every": 1, "eval_batches": 1, "sample_tokens": 8, "threads": 1}
    config = {"data": str(data), "out": str(out), "progress": False, "model": {"size": "tiny"}}
    pretrain(build(PretrainConfig, {**config, "train": train, "optim": {"warmup_steps": 2, "lr": 3e-3}}))


def _finetune(task: str, base: Path, train: str, dev: str, out: Path) -> None:
    config = {"task": task, "model": str(base), "out": str(out), "epochs": 4, "progress": False}
    config |= {
        "data": {"train": train, "eval": dev},
        "train": {"batch_size": 16, "threads": 1, "log_every": 2},
    }
    finetune(build(FinetuneConfig, {**config, "optim": {"lr": 1e-2}}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> Path:
    """A recipe-like output folder: runs/{data,model,classifier,ner,evaluate,int8}, each a real run."""
    root = tmp_path_factory.mktemp("report")
    folder = root / "runs"
    data = _prepare(root)
    _pretrain(data, folder / "model")
    train, dev = (
        _write_tsv(root / "train.tsv", _classify_rows(96, 0)),
        _write_tsv(root / "dev.tsv", _classify_rows(30, 1)),
    )
    _finetune("classify", make_tiny_bert(root / "bert", "model"), train, dev, folder / "classifier")
    conll_train, conll_dev = (
        _write_conll(root / "train.conll", 60, 0),
        _write_conll(root / "dev.conll", 20, 1),
    )
    _finetune("ner", make_tiny_bert(root / "bert_ner", "model"), conll_train, conll_dev, folder / "ner")
    evaluate(
        build(
            EvaluateConfig,
            {"model": str(folder / "classifier"), "data": dev, "attack": "typo", "attack_rate": 0.5}
            | {"out": str(folder / "evaluate"), "progress": False},
        )
    )
    measure = {"batch_size": 4, "seq_len": 16, "repeats": 1, "eval": dev}
    quantize(
        build(
            QuantizeConfig,
            {
                "model": str(folder / "classifier"),
                "out": str(folder / "int8"),
                "measure": measure,
                "progress": False,
            },
        )
    )
    return folder


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report_out") / "report"
    return write_report([runs], out, samples=2, sample_tokens=12), out


@pytest.fixture(scope="module")
def sections(runs):
    return {section.id: section for section in build_sections(find_runs([runs]), samples=1, sample_tokens=6)}


def _tables(section) -> list[Table]:
    return [block for block in section.blocks if isinstance(block, Table)]


def _table(section, first_header: str) -> Table:
    return next(table for table in _tables(section) if table.headers[0] == first_header)


def test_every_section_is_written_with_its_plots(written):
    result, out = written
    assert result["sections"] == SECTIONS and result["runs"] == 6
    page = (out / "report.html").read_text()
    assert re.findall(r'<section id="([a-z]+)">', page) == SECTIONS
    for name, section in re.findall(r'<section id="([a-z]+)">(.*?)</section>', page, flags=re.S):
        assert "<table>" in section and ("<img " in section) == (name not in WITHOUT_PLOTS)
    assert (
        len(re.findall(r"<img ", page))
        == result["figures"]
        == len(list((out / "report_files").glob("*.png")))
    )


def test_data_section_has_the_counts_of_stats_json(runs, sections):
    stats = json.loads((runs / "data" / "stats.json").read_text())
    assert stats["dropped"]["too_short"] == 2 and stats["duplicate_clusters"] == 2
    kept = _table(sections["data"], "kept or dropped (reason)")
    assert dict(kept.rows) == {"kept": stats["output"]["documents"], **stats["dropped"]}
    assert dict(_table(sections["data"], "language").rows) == stats["languages"]
    assert set(stats["languages"]) >= {"en", "zh"}
    assert dict(_table(sections["data"], "PII type").rows) == stats["pii_masked"]
    assert stats["pii_masked"] == {"email": 2, "phone": 1}


def test_training_section_has_curves_throughput_and_mfu(runs, sections):
    section = sections["training"]
    assert [f.name for f in section.figures()] == [
        "pretrain-model-curves",
        "finetune-classifier-curves",
        "finetune-ner-curves",
    ]
    records = [json.loads(line) for line in (runs / "model" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    summary = dict(next(t for t in _tables(section) if t.headers == ["", "value"]).rows)
    assert summary["optimizer steps"] == 8 and summary["last train loss"] == train[-1]["loss"]
    assert summary["median tokens/s"] > 0 and summary["median MFU (%)"] > 0
    validation = _table(section, "step")
    assert [row[0] for row in validation.rows] == [4, 8] and validation.headers[1] == "loss"


def test_evaluation_section_has_attack_confusion_matrix_and_entity_f1(runs, sections):
    section = sections["evaluation"]
    report = json.loads((runs / "evaluate" / "eval.json").read_text())
    metrics = next(t for t in _tables(section) if t.headers == ["metric", "clean", "attacked", "change"])
    accuracy = next(row for row in metrics.rows if row[0] == "accuracy")
    assert accuracy[1:3] == [report["accuracy"], report["attack"]["accuracy"]]
    matrices = [t for t in _tables(section) if t.headers[0] == "true \\ predicted"]
    assert len(matrices) == 3  # finetune's eval.json, evaluate clean and attacked
    assert [row[1:] for row in matrices[1].rows] == report["confusion_matrix"]
    entities = dict((row[0], row[3]) for row in _table(section, "entity type").rows)
    ner = json.loads((runs / "ner" / "eval.json").read_text())["per_type"]
    assert entities == {name: scores["f1"] for name, scores in ner.items()} and set(entities) == {
        "LOC",
        "PER",
    }
    names = [f.name for f in section.figures()]
    assert "evaluate-evaluate-attack" in names and "finetune-ner-entities" in names
    assert "evaluate-evaluate-confusion-attacked" in names


def test_compression_section_compares_source_and_result(runs, sections):
    document = json.loads((runs / "int8" / "compress.json").read_text())
    table = _tables(sections["compression"])[0]
    source, result = table.rows
    assert source[1] == "none" and result[1] == "int8"
    assert source[3] == document["source"]["bytes_on_disk"] / 1e6
    assert result[5] == document["result"]["latency_ms"] and result[6] == "accuracy"
    assert result[8] == document["comparison"]["speedup"] and "passed" in result[10]
    assert [f.name for f in sections["compression"].figures()] == ["compression-classifier"]


def test_generations_are_labelled_and_seeded(runs, sections):
    texts = [block.text for block in sections["generations"].blocks if hasattr(block, "text")]
    assert any(t.startswith("Logged by the training loop") for t in texts)
    assert any(t.startswith("Generated by this report") for t in texts)
    run = find_runs([runs / "model"])[0]
    state = torch.random.get_rng_state()
    first, again = continuations(run, 2, 5, seed=3), continuations(run, 2, 5, seed=3)
    assert first == again and len(first) == 2 and all(len(row) == 3 for row in first)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


def test_configs_section_has_every_run_config_and_wall_time(runs, sections):
    section = sections["configs"]
    table = _tables(section)[0]
    manifests = {row[1]: row for row in table.rows}
    for name in ("data", "model", "classifier", "ner", "evaluate", "int8"):
        wall = json.loads((runs / name / "run.json").read_text())["wall_time_s"]
        assert manifests[str(runs / name)][4] == wall
    codes = [block for block in section.blocks if hasattr(block, "summary")]
    assert len(codes) == 6 and "vocab_size: 300" in codes[0].text


def test_the_page_is_self_contained(written):
    page = (written[1] / "report.html").read_text()
    targets = re.findall(r"""\b(?:src|href)\s*=\s*(["']?)([^"'\s>]*)""", page)
    assert targets and all(quote == '"' and target.startswith(("data:", "#")) for quote, target in targets)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for tag in re.findall(r"<img [^>]*>", page):
        assert 'src="data:image/png;base64,' in tag and re.search(r'alt="[^"]{20,}"', tag)


def test_the_markdown_twin_has_the_same_sections_tables_and_plots(written):
    result, out = written
    markdown = (out / "report.md").read_text()
    assert re.findall(r'<a id="([a-z]+)"></a>', markdown) == SECTIONS
    images = re.findall(r"!\[[^\]]+\]\((report_files/[^)]+\.png)\)", markdown)
    assert len(images) == result["figures"] and all((out / image).is_file() for image in images)
    assert "| kept or dropped (reason) | documents |" in markdown and "|---|---|" in markdown


def test_a_second_report_replaces_its_own_files_only(runs, tmp_path):
    out = tmp_path / "report"
    write_report([runs], out, samples=0)
    (out / "notes.txt").write_text("mine")
    result = write_report([runs / "data"], out)
    assert result["sections"] == ["data", "configs"]
    assert sorted(p.name for p in (out / "report_files").iterdir()) == [
        "prepare-data-data.png",
        "wall-time.png",
    ]
    assert (out / "notes.txt").read_text() == "mine"


def test_runs_are_found_in_pipeline_order_once(runs, tmp_path):
    found = find_runs([runs / "int8", runs / "evaluate", runs, runs / "data"])
    assert [run.stage for run in found] == [
        "prepare",
        "pretrain",
        "finetune",
        "finetune",
        "evaluate",
        "quantize",
    ]
    copy = tmp_path / "copy"
    shutil.copytree(runs / "data", copy / ".data.partial-1", ignore=shutil.ignore_patterns("train", "val"))
    shutil.copytree(runs / "evaluate", copy / "nested" / "evaluate")
    (copy / "nested" / "evaluate" / "checkpoints").mkdir()
    shutil.copy(runs / "data" / "run.json", copy / "nested" / "evaluate" / "checkpoints" / "run.json")
    assert [run.folder for run in find_runs([copy])] == [copy / "nested" / "evaluate"]


def test_folders_without_runs_are_user_errors(runs, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match=r"empty is not a run folder: no run\.json"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(InputError, match="missing: no such folder"):
        find_runs([tmp_path / "missing"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        find_runs([tmp_path / "broken"])
    with pytest.raises(ConfigError, match="is a run folder"):
        write_report([runs / "data"], runs / "model")
    assert not (runs / "model" / "report.html").exists()


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_llmk("report", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("llmk report: error: ")
        and "empty is not a run folder" in lines[0]
    )
    result = run_llmk("report", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "llmk report RUN_DIR" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cell_formats_numbers_alike():
    assert [cell(v) for v in (None, True, 1234567, 0.123456, 20301.7, 1e-5, "x")] == [
        "—", "yes", "1,234,567", "0.1235", "20,302", "1.000e-05", "x"
    ]  # fmt: skip


@pytest.mark.e2e
def test_the_page_renders_in_chromium_with_every_plot(runs, browser, tmp_path):
    out = tmp_path / "report"
    result = run_llmk("report", str(runs), "--out", str(out), "--samples", "1", "--sample_tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "written to" in result.stdout
    browser.get((out / "report.html").as_uri())
    from selenium.webdriver.common.by import By

    sections = browser.find_elements(By.TAG_NAME, "section")
    assert [s.get_attribute("id") for s in sections] == SECTIONS
    for section in sections:
        plots = section.find_elements(By.TAG_NAME, "img")
        assert section.size["height"] > 100 and bool(plots) == (
            section.get_attribute("id") not in WITHOUT_PLOTS
        )
    images = browser.execute_script(
        "return [...document.images].map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
    )
    assert len(images) == len(list((out / "report_files").glob("*.png")))
    assert all(done and natural > 0 and shown > 0 for done, natural, shown in images), images
    links = browser.execute_script("return [...document.querySelectorAll('nav a')].map(a => a.hash)")
    assert links == [f"#{name}" for name in SECTIONS]
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 200, 20000))  # the whole page in one screenshot
    screenshots = REPO / "runs" / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshots / "report.png"))
