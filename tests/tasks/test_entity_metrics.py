"""Entity extraction and metrics, checked by hand against seqeval's default (conlleval) behaviour."""

from __future__ import annotations

import pytest

from llmkernel.tasks.metrics import entity_report, extract_entities
from llmkernel.tasks.report import format_entity_report


@pytest.mark.parametrize(
    ("tags", "entities"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        # I- after O starts an entity (conlleval), it is not dropped
        (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),
        (["I-PER"], [("PER", 0, 0)]),
        # I- of another type closes the open entity and starts a new one
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),
        # B- always starts a new entity, even of the same type
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),
        # an entity running to the end of the sentence is closed
        (["O", "B-ORG", "I-ORG"], [("ORG", 1, 2)]),
        # BIOES: E- and S- close their entity; I- after E- starts a new one
        (["B-PER", "E-PER", "S-LOC", "I-LOC", "E-LOC"], [("PER", 0, 1), ("LOC", 2, 2), ("LOC", 3, 4)]),
        (["O", "E-PER", "S-PER", "E-PER"], [("PER", 1, 1), ("PER", 2, 2), ("PER", 3, 3)]),
        # tags without a B-/I-/E-/S- prefix are outside every entity
        (["B-PER", "PER", "I-PER"], [("PER", 0, 0), ("PER", 2, 2)]),
        (["B-MISC", "X-MISC", "O"], [("MISC", 0, 0)]),
        # types may contain dashes; a bare prefix gets seqeval's "_" type
        (["B-WORK-OF-ART", "I-WORK-OF-ART"], [("WORK-OF-ART", 0, 1)]),
        (["B", "I", "O"], [("_", 0, 1)]),
        ([], []),
        (["O", "O"], []),
    ],
)
def test_extract_entities(tags, entities) -> None:
    assert extract_entities(tags) == entities


def test_seqeval_readme_example() -> None:
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    report = entity_report(y_true, y_pred)
    # true: MISC 3-5, PER 0-1; predicted: MISC 2-5 (wrong start), PER 0-1 -> 1 correct of 2 and 2
    assert report["precision"] == pytest.approx(0.5)
    assert report["recall"] == pytest.approx(0.5)
    assert report["f1"] == pytest.approx(0.5)
    assert report["per_type"] == {
        "MISC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }
    assert report["macro_f1"] == pytest.approx(0.5)
    assert report["token_accuracy"] == pytest.approx(8 / 10)  # tokens 2 and 3 of sentence 0 differ
    assert report["num_sentences"] == 2


def test_i_after_o_counts_as_entity() -> None:
    # the prediction's "O I-PER" is the entity PER 1-1 and matches the gold "O B-PER"
    report = entity_report([["O", "B-PER", "O"]], [["O", "I-PER", "O"]])
    assert (report["precision"], report["recall"], report["f1"]) == (1.0, 1.0, 1.0)
    assert report["token_accuracy"] == pytest.approx(2 / 3)


def test_types_only_predicted_count_with_zero_support() -> None:
    y_true = [["B-PER", "I-PER", "O", "B-LOC"]]
    y_pred = [["B-PER", "I-PER", "B-ORG", "B-LOC"]]
    report = entity_report(y_true, y_pred)
    assert report["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # micro: 2 correct, 3 predicted, 2 true -> p 2/3, r 1, f1 0.8; macro over LOC, ORG, PER = (1 + 0 + 1) / 3
    assert report["precision"] == pytest.approx(2 / 3)
    assert report["recall"] == pytest.approx(1.0)
    assert report["f1"] == pytest.approx(0.8)
    assert report["macro_f1"] == pytest.approx(2 / 3)


def test_same_span_in_different_sentences_are_distinct_entities() -> None:
    report = entity_report([["B-PER"], ["B-PER"]], [["B-PER"], ["O"]])
    assert report["per_type"]["PER"]["support"] == 2
    assert (report["precision"], report["recall"]) == (1.0, 0.5)


def test_no_entities_is_all_zero() -> None:
    report = entity_report([["O", "O"]], [["O", "O"]])
    assert (report["precision"], report["recall"], report["f1"], report["macro_f1"]) == (0.0, 0.0, 0.0, 0.0)
    assert report["token_accuracy"] == 1.0
    assert report["per_type"] == {}


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="sentence 1 has 2 true tags but 1 predicted"):
        entity_report([["O"], ["O", "B-PER"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 true sentences but 1 predicted"):
        entity_report([["O"], ["O"]], [["O"]])


def test_format_entity_report() -> None:
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    lines = format_entity_report(entity_report(y_true, y_pred)).splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["MISC", "0.0000", "0.0000", "0.0000", "1"]
    assert lines[3].split() == ["PER", "1.0000", "1.0000", "1.0000", "1"]
    assert lines[5].split() == ["micro", "avg", "0.5000", "0.5000", "0.5000", "2"]
    assert lines[6].split() == ["macro", "avg", "0.5000", "2"]
    assert lines[-1] == "token accuracy 0.8000 over 2 sentences"
    assert format_entity_report(entity_report([["O"]], [["O"]])).splitlines()[-1].startswith("token accuracy")
