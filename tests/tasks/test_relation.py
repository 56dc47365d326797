"""The relation task: SemEval-2010 Task 8's official score (hand-computed cases and a literal port of the
Perl scorer), entity marking and reading, encoding with markers, the model folder, and the CLI."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
import torch

from llmkernel.errors import InputError
from llmkernel.models.loading import load_model, model_kind
from llmkernel.tasks.metrics import relation_report, relation_type
from llmkernel.tasks.relation import (
    RelationClassify,
    add_markers,
    check_marked,
    encode_marked,
    mark_spans,
    read_relations,
    strip_markers,
)
from tests.conftest import fails_in_one_line, run_llmk
from tests.tiny_models import make_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")

A12, A21, B12, B21, OTHER = "A(e1,e2)", "A(e2,e1)", "B(e1,e2)", "B(e2,e1)", "Other"
LABELS = [A12, A21, B12, B21, OTHER]


def report_of(gold: list[str], predicted: list[str], labels=LABELS) -> dict:
    return relation_report([labels.index(g) for g in gold], [labels.index(p) for p in predicted], labels)


# ------------------------------------------------------------------------------------- official score


def test_hand_computed_scores():
    gold = [A12, A12, A21, B12, B21, OTHER, OTHER]
    pred = [A12, A21, A21, A12, OTHER, B12, OTHER]
    report = report_of(gold, pred)
    a, b = report["per_relation"]["A"], report["per_relation"]["B"]
    # A: 3 gold; predicted A four times (examples 0-3), right with direction twice, once the wrong way
    assert (a["correct"], a["predicted"], a["support"], a["wrong_direction"]) == (2, 4, 3, 1)
    assert a["precision"] == pytest.approx(2 / 4) and a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(4 / 7)
    # B: 2 gold, predicted once (for Other), never right
    assert (b["correct"], b["predicted"], b["support"], b["f1"]) == (0, 1, 2, 0.0)
    assert report["official_macro_f1"] == pytest.approx((4 / 7 + 0) / 2)  # Other is not averaged
    assert report["macro_precision"] == pytest.approx(0.25)
    assert report["macro_recall"] == pytest.approx(1 / 3)
    # micro over A and B: 2 correct of 5 predicted, of 5 gold
    for name in ("micro_precision", "micro_recall", "micro_f1"):
        assert report[name] == pytest.approx(0.4)
    assert report["accuracy"] == pytest.approx(3 / 7)  # exact labels, Other included
    # ignoring direction, A is right 3 times of 4 predicted: F1 6/7; B 0
    assert report["undirected_macro_f1"] == pytest.approx(3 / 7)
    # over the directed labels: A12 1/2 and 1/2, A21 1/2 and 1/1, B12 and B21 0
    assert report["label_macro_f1"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert report["per_relation"]["Other"]["f1"] == pytest.approx(0.5)


def test_what_the_readme_of_the_data_says():
    """A prediction counts only with the right direction; predicting Other for a relation is a miss;
    a perfect answer scores 1; answering Other everywhere scores 0."""
    gold = [A12, A21, B12, B21, OTHER]
    assert report_of(gold, gold)["official_macro_f1"] == 1.0
    flipped = report_of(gold, [A21, A12, B21, B12, OTHER])
    assert flipped["official_macro_f1"] == 0.0 and flipped["undirected_macro_f1"] == 1.0
    assert report_of(gold, [OTHER] * 5)["official_macro_f1"] == 0.0
    # a wrong direction costs precision too: predicting A12 for the A21 example lowers A's precision
    one_flip = report_of(gold, [A12, A12, B12, B21, OTHER])["per_relation"]["A"]
    assert (one_flip["precision"], one_flip["recall"]) == (0.5, 0.5)


def test_types_only_predicted_are_not_averaged():
    """The scorer loops over the types in the answer key: predicting a type absent from it lowers the
    precision of nothing but the micro average, and the macro average divides by the gold types."""
    report = report_of([A12, A12, OTHER], [A12, B12, OTHER])
    assert set(report["per_relation"]) == {"A", "Other"}
    assert report["official_macro_f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def perl_scorer_official(gold: list[str], proposed: list[str]) -> float:
    """A literal port of the official part of semeval2010_task8_scorer-v1.2.pl (its hashes and sums):
    confMatrix10wayWithDir with the WRONG_DIR row, P = conf{l}{l} / (allLabelsProposed{l} + wrongDir{l})."""
    conf: dict = defaultdict(lambda: defaultdict(int))
    proposed_counts: dict = defaultdict(int)
    answer_counts: dict = defaultdict(int)
    undirected = relation_type
    for p, a in zip(proposed, gold):
        p_nodir, a_nodir = undirected(p), undirected(a)
        if p == a:
            conf[p_nodir][a_nodir] += 1
            proposed_counts[p_nodir] += 1
        elif p_nodir == a_nodir:
            conf["WRONG_DIR"][a_nodir] += 1
            proposed_counts["WRONG_DIR"] += 1
        else:
            conf[p_nodir][a_nodir] += 1
            proposed_counts[p_nodir] += 1
    for a in gold:
        answer_counts[undirected(a)] += 1
    macro = 0.0
    for label in sorted(answer_counts):
        wrong = conf["WRONG_DIR"][label]
        p = (
            0
            if proposed_counts[label] == 0
            else 100.0 * conf[label][label] / (proposed_counts[label] + wrong)
        )
        r = 100.0 * conf[label][label] / answer_counts[label]
        f1 = 0 if p + r == 0 else 2 * p * r / (p + r)
        if label != "Other":
            macro += f1
    return macro / (len(answer_counts) - (1 if "Other" in answer_counts else 0)) / 100


SEMEVAL_LABELS = [
    f"{name}({direction})"
    for name in (
        "Cause-Effect",
        "Component-Whole",
        "Content-Container",
        "Entity-Destination",
        "Entity-Origin",
    )
    for direction in ("e1,e2", "e2,e1")
] + ["Other"]


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_the_perl_scorer_on_random_answers(seed):
    rng = random.Random(seed)
    gold = [rng.choice(SEMEVAL_LABELS) for _ in range(300)]
    # mostly right, else a flipped direction, Other, or anything
    proposed = []
    for label in gold:
        roll = rng.random()
        if roll < 0.5:
            proposed.append(label)
        elif roll < 0.7 and label != "Other":
            proposed.append(label.replace("e1,e2", "x").replace("e2,e1", "e1,e2").replace("x", "e2,e1"))
        elif roll < 0.85:
            proposed.append("Other")
        else:
            proposed.append(rng.choice(SEMEVAL_LABELS))
    report = report_of(gold, proposed, SEMEVAL_LABELS)
    assert report["official_macro_f1"] == pytest.approx(perl_scorer_official(gold, proposed), abs=1e-12)


def test_relation_type_strips_the_direction_only():
    assert relation_type("Cause-Effect(e2,e1)") == "Cause-Effect"
    assert relation_type("Other") == "Other"
    assert relation_type("per:city_of_birth") == "per:city_of_birth"


# ------------------------------------------------------------------------------------ marking, reading


def test_spans_become_inline_markers():
    text = "The most common audits were about waste and recycling."
    marked = mark_spans(text, [16, 22], [34, 39])
    assert marked == "The most common <e1>audits</e1> were about <e2>waste</e2> and recycling."
    assert strip_markers(marked) == text
    assert mark_spans("waste of audits", [9, 15], [0, 5]) == "<e2>waste</e2> of <e1>audits</e1>"
    check_marked(marked)


@pytest.mark.parametrize(
    "e1, e2, message",
    [([0, 99], [1, 2], "out of range"), ([3, 3], [5, 6], "out of range"), ([0, 5], [3, 8], "overlap"),
     ([-1, 2], [4, 5], "out of range"), ([0, 1.5], [3, 4], "[start, end]")],
)  # fmt: skip
def test_bad_spans_say_why(e1, e2, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mark_spans("hello world again", e1, e2)


@pytest.mark.parametrize(
    "text, message",
    [("no markers here", "no <e1>"), ("<e1>a</e1> and b", "no <e2>"), ("<e1>a</e1> <e2>b", "no </e2>"),
     ("<e1>a</e1> <e2></e2>", "empty"), ("<e1>a <e2>b</e2></e1>", "overlap"),
     ("<e1>a</e1> <e1>b</e1> <e2>c</e2>", "2 <e1>")],
)  # fmt: skip
def test_bad_inline_markers_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        check_marked(text)


def test_read_relations_from_markers_and_spans(tmp_path):
    path = tmp_path / "rel.jsonl"
    rows = [
        {"id": 1, "text": "The <e1>audits</e1> were about <e2>waste</e2>.", "label": "Message-Topic(e1,e2)"},
        {"text": "waste of audits", "e1": [9, 15], "e2": {"start": 0, "end": 5}, "label": "X"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = read_relations(path)
    assert data.texts[1] == "<e2>waste</e2> of <e1>audits</e1>"
    assert data.labels == ["Message-Topic(e1,e2)", "X"]


@pytest.mark.parametrize(
    "row, message",
    [({"text": "no markers", "label": "Other"}, "line 1: no <e1>"),
     ({"text": "hello world", "e1": [0, 5], "label": "Other"}, "only e1"),
     ({"text": "hello world", "e1": [0, 5], "e2": [6, 50], "label": "Other"}, "out of range"),
     ({"text": "<e1>a</e1> <e2>b</e2>"}, "no label column")],
)  # fmt: skip
def test_read_relations_rejects_bad_rows_by_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match=message):
        read_relations(path)


def test_the_shared_data_parses(shared_data):
    """Every SemEval sentence has both entities marked (as the data's README says)."""
    folder = shared_data / "semeval2010_task8"
    train, test = read_relations(folder / "train.jsonl"), read_relations(folder / "test.jsonl")
    assert (len(train), len(test)) == (8000, 2717)
    assert len(set(train.labels)) == 19 and train.labels.count("Other") == 1410


# ------------------------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert-rel"), "model")


@pytest.fixture
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return tokenizer


def test_markers_are_single_tokens_and_start_positions_point_at_them(tokenizer):
    markers = add_markers(tokenizer)
    assert add_markers(tokenizer) == markers  # adding again keeps the ids
    [example] = encode_marked(tokenizer, ["hello <e1>alice</e1> lives in <e2>paris</e2>"], 64, markers)
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens[:4] == ["[CLS]", "hello", "<e1>", "alice"]
    e1, e2 = example["entity_positions"]
    assert (tokens[e1], tokens[e2]) == ("<e1>", "<e2>")


def test_long_texts_are_cut_around_the_entities(tokenizer):
    markers = add_markers(tokenizer)
    filler = " ".join(["world"] * 40)
    texts = [
        f"{filler} <e1>alice</e1> lives in <e2>paris</e2> {filler}",  # both fit: a window around them
        f"<e1>alice</e1> {filler} {filler} <e2>paris</e2>",  # too far apart: each start kept
    ]
    for example in encode_marked(tokenizer, texts, 16, markers):
        ids = example["input_ids"]
        assert len(ids) == 16 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert [ids[p] for p in example["entity_positions"]] == markers.starts
    whole = encode_marked(tokenizer, texts[:1], 16, markers)[0]["input_ids"]
    assert markers.e1_end in whole and markers.e2_end in whole


# ------------------------------------------------------------------------------------ model and CLI

PEOPLE, CITIES = ["alice", "bob"], ["paris", "berlin"]


def _relation_rows(count: int, seed: int) -> list[dict]:
    """Lives-In between a person and a city in either order (the direction follows the order), else Other."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        first, second = rng.choice([(rng.choice(PEOPLE), rng.choice(CITIES)), (rng.choice(CITIES), rng.choice(PEOPLE)),
                                    (rng.choice(PEOPLE), rng.choice(PEOPLE))])  # fmt: skip
        filler = " ".join(rng.choices(["hello", "world", "the", "lives", "in", "me"], k=rng.randint(1, 4)))
        text = f"<e1>{first}</e1> {filler} <e2>{second}</e2>"
        if first in PEOPLE and second in CITIES:
            label = "Lives-In(e1,e2)"
        elif first in CITIES:
            label = "Lives-In(e2,e1)"
        else:
            label = "Other"
        rows.append({"text": text, "label": label})
    return rows


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def relation_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("relations")
    return _write_jsonl(root / "train.jsonl", _relation_rows(240, 0)), _write_jsonl(
        root / "dev.jsonl", _relation_rows(60, 1)
    )


def test_a_fresh_model_saves_and_loads_through_the_one_loader(tiny_bert, tokenizer, relation_files, tmp_path):
    from types import SimpleNamespace

    data = SimpleNamespace(train=relation_files[0], eval=relation_files[1], limit=0, eval_fraction=0.1)
    config = SimpleNamespace(max_position_embeddings=128)
    task = RelationClassify.from_training_files(tokenizer, config, data, 0, 8, 0)
    assert task.labels == ["Lives-In(e1,e2)", "Lives-In(e2,e1)", "Other"] and task.other == "Other"
    model = load_model(tiny_bert, task.model_kind, new_head=task.new_head())
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    batch = task.collate(task.eval[:4])
    logits = model(**task.model_inputs(batch)).logits
    assert logits.shape == (4, 3)
    # the positions are found in the ids when not given
    inferred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits, inferred)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert model_kind(tmp_path) == "relation_classifier"
    again = load_model(tmp_path, "relation_classifier").eval()
    model.eval()
    assert torch.allclose(model(**task.model_inputs(batch)).logits, again(**task.model_inputs(batch)).logits)
    with pytest.raises(ValueError, match="no <e2> marker"):
        again(input_ids=torch.tensor([[2, task.markers.e1_start, 5, 3]]))


@pytest.mark.e2e
def test_relation_through_the_cli_then_evaluate(tiny_bert, relation_files, tmp_path):
    train, dev = relation_files
    out = tmp_path / "tuned"
    args = ["finetune", "relation", "--model", str(tiny_bert), "--data.train", train, "--data.eval", dev,
            "--epochs", "8", "--optim.lr", "5e-3", "--out", str(out), "--progress", "false"]  # fmt: skip
    result = run_llmk(*args)
    assert result.returncode == 0, result.stderr
    assert "official score" in result.stdout and "wrong dir" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["EncoderForRelationClassification"]
    assert config["model_type"] == "relation_classifier"
    tokenizer_config = json.loads((out / "tokenizer.json").read_text())
    assert {"<e1>", "</e1>", "<e2>", "</e2>"} <= {
        token["content"] for token in tokenizer_config["added_tokens"]
    }
    report = json.loads((out / "eval.json").read_text())
    assert report["task"] == "relation"
    assert set(report["per_relation"]) == {"Lives-In", "Other"}
    assert report["official_macro_f1"] > 0.8  # who is marked first decides the direction

    evaluated = run_llmk("evaluate", str(out), "--data", dev, "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert again["official_macro_f1"] == pytest.approx(report["official_macro_f1"])
    assert "official score" in evaluated.stdout


@pytest.mark.e2e
def test_bad_input_is_one_line_and_exit_2(tiny_bert, relation_files, tmp_path):
    train, dev = relation_files
    base = ["finetune", "relation", "--model", str(tiny_bert), "--out", str(tmp_path / "out")]
    unmarked = _write_jsonl(tmp_path / "unmarked.jsonl", [{"text": "alice lives in paris", "label": "Other"}])
    assert "no <e1> marker" in fails_in_one_line(*base, "--data.train", unmarked)
    one = _write_jsonl(tmp_path / "one.jsonl", [{"text": "<e1>alice</e1> lives in paris", "label": "Other"}])
    assert "no <e2> marker" in fails_in_one_line(*base, "--data.train", one)
    spans = _write_jsonl(
        tmp_path / "spans.jsonl", [{"text": "alice", "e1": [0, 5], "e2": [3, 9], "label": "X"}]
    )
    assert "out of range" in fails_in_one_line(*base, "--data.train", spans)
    assert not (tmp_path / "out").exists()
    # evaluation: a label the model does not know
    out = tmp_path / "tuned"
    tuned = run_llmk(*base[:-1], str(out), "--data.train", train, "--data.eval", dev, "--train.max_steps", "2",
                     "--progress", "false")  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    unknown = _write_jsonl(
        tmp_path / "unknown.jsonl", [{"text": "<e1>a</e1> <e2>b</e2>", "label": "Born-In(e1,e2)"}]
    )
    assert "Born-In(e1,e2)" in fails_in_one_line(
        "evaluate", str(out), "--data", unknown, "--out", str(tmp_path / "e")
    )
    assert "no <e1> marker" in fails_in_one_line(
        "evaluate", str(out), "--data", unmarked, "--out", str(tmp_path / "e")
    )


def test_prune_quantize_and_distill_refuse_a_relation_model_in_one_line(tmp_path):
    """Their measurements feed random token ids, which hold no entity markers: both refuse the kind (an
    InputError, so one line and exit 2 from the CLI); `llmk export --format safetensors` takes it."""
    from llmkernel.compress.config import PruneConfig, QuantizeConfig
    from llmkernel.compress.prune import prune
    from llmkernel.compress.quantize import quantize
    from llmkernel.config import build
    from tests.tiny_models import make_tiny_relation

    folder = make_tiny_relation(tmp_path / "tiny")
    with pytest.raises(InputError, match="a relation_classifier model; llmk quantize takes"):
        quantize(build(QuantizeConfig, {"model": str(folder), "out": str(tmp_path / "q")}))
    calibration = _write_jsonl(tmp_path / "cal.jsonl", _relation_rows(4, 0))
    with pytest.raises(InputError, match="pruning does not support EncoderForRelationClassification"):
        prune(build(PruneConfig, {"model": str(folder), "out": str(tmp_path / "p"), "ffn": 0.5,
                                  "calibration": calibration}))  # fmt: skip
    from llmkernel.compress.distill import check_pair

    with pytest.raises(InputError, match="llmk distill .* does not take relation models"):
        check_pair(folder, folder)
    assert not (tmp_path / "q").exists() and not (tmp_path / "p").exists()
