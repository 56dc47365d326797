"""Classification metrics against values worked out by hand, the printed table and the PNG."""

from __future__ import annotations

import json

import pytest

from llmkernel.errors import InputError
from llmkernel.tasks.metrics import classification_report, most_confused_pairs
from llmkernel.tasks.report import MAX_MATRIX_LABELS, format_classification_report, plot_confusion_matrix

LABELS = ["neg", "neu", "pos"]
# confusion (rows true, columns predicted):
#   neg: [1, 1, 0]   neu: [0, 2, 0]   pos: [1, 1, 1]   column sums 2, 4, 1
Y_TRUE = [0, 0, 1, 1, 2, 2, 2]
Y_PRED = [0, 1, 1, 1, 2, 0, 1]


def test_three_class_report_matches_hand_computed_values() -> None:
    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 1, 1]]
    assert report["num_examples"] == 7
    assert report["labels"] == LABELS
    # neg: tp 1, predicted 2, support 2 -> p 1/2, r 1/2, f1 1/2
    # neu: tp 2, predicted 4, support 2 -> p 1/2, r 1, f1 2/3
    # pos: tp 1, predicted 1, support 3 -> p 1, r 1/3, f1 1/2
    expected = {
        "neg": (1 / 2, 1 / 2, 1 / 2, 2),
        "neu": (1 / 2, 1.0, 2 / 3, 2),
        "pos": (1.0, 1 / 3, 1 / 2, 3),
    }
    for label, (precision, recall, f1, support) in expected.items():
        stats = report["per_class"][label]
        assert stats["precision"] == pytest.approx(precision)
        assert stats["recall"] == pytest.approx(recall)
        assert stats["f1"] == pytest.approx(f1)
        assert stats["support"] == support
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert report["micro_f1"] == pytest.approx(4 / 7)
    assert report["macro_precision"] == pytest.approx(2 / 3)  # (1/2 + 1/2 + 1) / 3
    assert report["macro_recall"] == pytest.approx(11 / 18)  # (1/2 + 1 + 1/3) / 3
    assert report["macro_f1"] == pytest.approx(5 / 9)  # (1/2 + 2/3 + 1/2) / 3
    assert report["weighted_f1"] == pytest.approx(23 / 42)  # (2 * 1/2 + 2 * 2/3 + 3 * 1/2) / 7
    json.dumps(report)  # plain JSON types only


def test_zero_division_gives_zero_and_absent_labels_count_in_macro() -> None:
    # "b" is never predicted (precision 0/0 -> 0), "c" never occurs and is never predicted
    report = classification_report([0, 1, 1], [0, 0, 0], ["a", "b", "c"])
    a, b, c = (report["per_class"][label] for label in "abc")
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 3, 1.0, 1 / 2))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (0.0, 0.0, 0.0, 2)
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 0)
    assert report["macro_f1"] == pytest.approx(1 / 6)  # (1/2 + 0 + 0) / 3
    assert report["weighted_f1"] == pytest.approx(1 / 6)  # (1 * 1/2 + 2 * 0) / 3
    assert report["accuracy"] == pytest.approx(1 / 3)


def test_perfect_predictions() -> None:
    report = classification_report([0, 1, 2, 1], [0, 1, 2, 1], LABELS)
    assert report["accuracy"] == report["macro_f1"] == report["weighted_f1"] == 1.0


def test_empty_input_is_all_zero() -> None:
    report = classification_report([], [], LABELS)
    assert report["num_examples"] == 0
    assert report["accuracy"] == report["macro_f1"] == report["weighted_f1"] == 0.0
    assert report["confusion_matrix"] == [[0, 0, 0]] * 3


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "message"),
    [
        ([0, 1], [0], LABELS, "2 true labels but 1 predictions"),
        ([0, 3], [0, 1], LABELS, "label id 3 in y_true"),
        ([0, 1], [0, -1], LABELS, "label id -1 in y_pred"),
        ([0], [0], [], "label list is empty"),
    ],
)
def test_bad_input_raises_input_error(y_true, y_pred, labels, message) -> None:
    with pytest.raises(InputError, match=message):
        classification_report(y_true, y_pred, labels)


def test_format_has_rows_averages_and_matrix() -> None:
    labels = ["neg", "neu", "a_very_long_label_name"]
    text = format_classification_report(classification_report(Y_TRUE, Y_PRED, labels))
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["neg", "0.5000", "0.5000", "0.5000", "2"]
    assert lines[3].split() == ["neu", "0.5000", "1.0000", "0.6667", "2"]
    assert lines[4].split() == ["a_very_long…", "1.0000", "0.3333", "0.5000", "3"]
    assert "a_very_long_label_name" not in text
    accuracy = next(line for line in lines if line.strip().startswith("accuracy"))
    assert accuracy.split() == ["accuracy", "0.5714", "7"]
    macro = next(line for line in lines if "macro avg" in line)
    assert macro.split() == ["macro", "avg", "0.6667", "0.6111", "0.5556", "7"]
    weighted = next(line for line in lines if "weighted avg" in line)
    # weighted precision (2 * 1/2 + 2 * 1/2 + 3 * 1) / 7 = 5/7, recall = accuracy 4/7, f1 23/42
    assert weighted.split() == ["weighted", "avg", "0.7143", "0.5714", "0.5476", "7"]
    header = lines.index("confusion matrix (rows: true, columns: predicted)")
    assert lines[header + 1].split() == ["true", "\\", "pred", "neg", "neu", "a_very_long…"]
    assert lines[header + 2].split() == ["neg", "1", "1", "0"]
    assert lines[header + 4].split() == ["a_very_long…", "1", "1", "1"]


def test_plot_writes_png_atomically(tmp_path) -> None:
    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    path = plot_confusion_matrix(report["confusion_matrix"], LABELS, tmp_path / "plots" / "cm.png", title="t")
    assert path == tmp_path / "plots" / "cm.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # no temp file left behind


def test_plot_many_labels_and_empty_rows(tmp_path) -> None:
    labels = [f"class_{i}" for i in range(24)]
    matrix = [[0] * 24 for _ in range(24)]  # rows with no examples must not divide by zero
    matrix[0][1] = 5
    path = plot_confusion_matrix(matrix, labels, tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_most_confused_pairs_are_the_largest_off_diagonal_cells() -> None:
    report = classification_report(Y_TRUE, Y_PRED, LABELS)  # errors: neg->neu 1, pos->neg 1, pos->neu 1
    assert report["confused_pairs"] == [
        {"true": "neg", "predicted": "neu", "count": 1, "share": 0.5},
        {"true": "pos", "predicted": "neg", "count": 1, "share": pytest.approx(1 / 3)},
        {"true": "pos", "predicted": "neu", "count": 1, "share": pytest.approx(1 / 3)},
    ]
    assert most_confused_pairs([[5, 0], [0, 5]], ["a", "b"]) == []  # no error, no pair
    assert len(most_confused_pairs([[0, 1, 1], [1, 0, 1], [1, 1, 0]], ["a", "b", "c"], top=2)) == 2


def test_many_labels_print_the_most_confused_pairs_instead_of_the_matrix() -> None:
    labels = [f"intent_{i}" for i in range(MAX_MATRIX_LABELS + 1)]
    y_true = [i for i in range(len(labels)) for _ in range(4)]
    y_pred = [(i + 1) % len(labels) if k == 0 else i for i in range(len(labels)) for k in range(4)]
    y_pred[1] = 5  # intent_0 also mistaken once for intent_5
    text = format_classification_report(classification_report(y_true, y_pred, labels))
    assert "confusion matrix" not in text and "most confused pairs" in text
    assert "  intent_0 -> intent_1: 1 (25%)" in text and "  intent_0 -> intent_5: 1 (25%)" in text
