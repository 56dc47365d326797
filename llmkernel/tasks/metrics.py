"""Metric functions, pure: classification (accuracy, per-class precision/recall/F1, the confusion matrix)
and entity-level NER scores. Training and evaluation both compute them through the tasks.

Classification follows scikit-learn's `precision_recall_fscore_support` called with every label listed
(`labels=range(len(labels))`) and `zero_division=0`: a class that is never predicted has precision 0.0, a
class with no true examples has recall 0.0, and every listed label counts in the macro average, even one
that never occurs. With one label per example, micro F1 equals accuracy.

Entities are the same as seqeval's default mode (conlleval chunking) for IOB2 and BIOES tags: an entity is
a chunk (type, start, end); a predicted entity counts as correct only when a true entity has the same type,
start and end. `B-X` and `S-X` always start a chunk, `I-X` or `E-X` continue a chunk of type X and start a
new one after `O`, after `E-`/`S-` or after a different type, and `E-X`/`S-X` close their chunk. `O` and any
tag without a `B-`/`I-`/`E-`/`S-` prefix are outside every chunk. (seqeval would read a bare `PER` as tag
`P`, type `ER`; treating it as outside is the one deliberate difference.)

Relations follow SemEval-2010 Task 8's official scorer (semeval2010_task8_scorer-v1.2.pl): the official
score is its "(9+1)-way evaluation with directionality taken into account", the macro-averaged F1 over the
relation types with `Other` left out (`relation_report`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmkernel.errors import InputError


def _check_ids(ids: np.ndarray, name: str, num_labels: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
        bad = int(ids[(ids < 0) | (ids >= num_labels)][0])
        raise InputError(
            f"label id {bad} in {name} is outside 0..{num_labels - 1} ({num_labels} labels); "
            "make the label list match the ids the data and the model use"
        )


def safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, 0.0 where the denominator is 0 (sklearn's zero_division=0)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class and averaged precision/recall/F1, and the confusion matrix, as plain JSON types.

    Args:
        y_true: the true label id of each example; ids index into `labels`.
        y_pred: the predicted label id of each example.
        labels: the label names, one per id.

    Returns:
        {"accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision", "macro_recall",
        "num_examples", "labels", "per_class": {label: {"precision", "recall", "f1", "support"}},
        "confusion_matrix": rows = true label, columns = predicted label,
        "confused_pairs": the most frequent errors (`most_confused_pairs`)}.

    Raises:
        InputError: `y_true` and `y_pred` differ in length, `labels` is empty, or an id is out of range.
    """
    labels = [str(label) for label in labels]
    if not labels:
        raise InputError("the label list is empty; pass the class names, one per label id")
    if len(y_true) != len(y_pred):
        raise InputError(
            f"{len(y_true)} true labels but {len(y_pred)} predictions; evaluate one prediction per example"
        )
    num_labels = len(labels)
    true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    _check_ids(true, "y_true", num_labels)
    _check_ids(pred, "y_pred", num_labels)

    # confusion[t, p] = examples of true class t predicted as p; bincount over the flattened pair index
    confusion = np.bincount(true * num_labels + pred, minlength=num_labels * num_labels)
    confusion = confusion.reshape(num_labels, num_labels)
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)  # column sums: examples predicted as each class
    support = confusion.sum(axis=1)  # row sums: true examples of each class

    precision = safe_divide(true_positives, predicted)
    recall = safe_divide(true_positives, support.astype(np.float64))
    # 2tp / (2tp + fp + fn), the form sklearn uses; equal to the harmonic mean where both are defined
    f1 = safe_divide(2 * true_positives, predicted + support)

    num_examples = int(true.size)
    correct = float(true_positives.sum())
    accuracy = correct / num_examples if num_examples else 0.0
    # micro F1 = 2 * sum(tp) / (sum(predicted) + sum(support)) = accuracy when every prediction is a label
    micro_denominator = predicted.sum() + support.sum()
    micro_f1 = float(2 * correct / micro_denominator) if micro_denominator else 0.0
    weighted_f1 = float((f1 * support).sum() / support.sum()) if support.sum() else 0.0

    return {
        "accuracy": accuracy,
        "macro_f1": float(f1.mean()),
        "micro_f1": micro_f1,
        "weighted_f1": weighted_f1,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "num_examples": num_examples,
        "labels": labels,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion.astype(int).tolist(),
        "confused_pairs": most_confused_pairs(confusion.tolist(), labels),
    }


def most_confused_pairs(
    confusion: Sequence[Sequence[int]], labels: Sequence[str], top: int = 10
) -> list[dict[str, Any]]:
    """The `top` (true, predicted) pairs of different labels with the most errors, most first: what a
    77-intent confusion matrix says that nobody can read off its 5,929 cells.

    Returns [{"true", "predicted", "count", "share"}], share = count / the true label's support.
    """
    pairs = []
    for t, row in enumerate(confusion):
        support = sum(row)
        for p, count in enumerate(row):
            if t != p and count > 0:
                pairs.append({"true": labels[t], "predicted": labels[p], "count": int(count),
                              "share": count / support})  # fmt: skip
    pairs.sort(key=lambda pair: (-pair["count"], -pair["share"], pair["true"], pair["predicted"]))
    return pairs[:top]


PREFIXES = ("B", "I", "E", "S")
OUTSIDE = "O"


def _split_tag(tag: str) -> tuple[str, str]:
    """`B-PER` -> ("B", "PER"); a bare `B` -> ("B", "_") as in seqeval; anything else -> ("O", "")."""
    prefix, dash, entity_type = tag.partition("-")
    if prefix not in PREFIXES or (dash and not entity_type):
        return OUTSIDE, ""
    return prefix, entity_type or "_"


def _chunk_ends(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    """Whether the chunk open at the previous tag ends before the current one (conlleval endOfChunk)."""
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", OUTSIDE):
        return True
    return prev_prefix != OUTSIDE and prev_type != entity_type


def _chunk_starts(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    """Whether a new chunk starts at the current tag (conlleval startOfChunk)."""
    if prefix in ("B", "S"):
        return True
    if prev_prefix in ("E", "S", OUTSIDE) and prefix in ("I", "E"):
        return True
    return prefix != OUTSIDE and prev_type != entity_type


def extract_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities in one tag sequence as (type, start, end) with `end` inclusive, in order.

    >>> extract_entities(["B-PER", "I-PER", "O", "I-LOC"])
    [('PER', 0, 1), ('LOC', 3, 3)]
    """
    entities = []
    prev_prefix, prev_type, start = OUTSIDE, "", 0
    # a trailing "O" closes a chunk that runs to the end of the sentence
    for index, tag in enumerate([*tags, OUTSIDE]):
        prefix, entity_type = _split_tag(tag)
        if _chunk_ends(prev_prefix, prefix, prev_type, entity_type):
            entities.append((prev_type, start, index - 1))
        if _chunk_starts(prev_prefix, prefix, prev_type, entity_type):
            start = index
        prev_prefix, prev_type = prefix, entity_type
    return entities


def _prf(correct: int, predicted: int, support: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_report(
    true_sequences: Sequence[Sequence[str]], pred_sequences: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """Entity precision/recall/F1 (micro over all entities), macro F1 over types, and token accuracy.

    Args:
        true_sequences: the gold tags, one list per sentence.
        pred_sequences: the predicted tags, same shape.

    Returns:
        {"precision", "recall", "f1", "macro_f1", "token_accuracy", "num_sentences",
        "per_type": {type: {"precision", "recall", "f1", "support"}}}; support is the number of true
        entities of the type; types seen only in predictions are listed with support 0 and count in the
        macro average, as in seqeval.

    Raises:
        ValueError: the number of sentences, or the length of a pair of sentences, differs.
    """
    if len(true_sequences) != len(pred_sequences):
        raise ValueError(
            f"{len(true_sequences)} true sentences but {len(pred_sequences)} predicted sentences"
        )
    true_counts: Counter[str] = Counter()
    pred_counts: Counter[str] = Counter()
    correct_counts: Counter[str] = Counter()
    correct_tokens = total_tokens = 0
    for index, (true_tags, pred_tags) in enumerate(zip(true_sequences, pred_sequences)):
        if len(true_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {index} has {len(true_tags)} true tags but {len(pred_tags)} predicted tags"
            )
        true_entities = set(extract_entities(true_tags))
        pred_entities = set(extract_entities(pred_tags))
        true_counts.update(entity[0] for entity in true_entities)
        pred_counts.update(entity[0] for entity in pred_entities)
        correct_counts.update(entity[0] for entity in true_entities & pred_entities)
        correct_tokens += sum(t == p for t, p in zip(true_tags, pred_tags))
        total_tokens += len(true_tags)

    per_type = {
        entity_type: {
            **_prf(correct_counts[entity_type], pred_counts[entity_type], true_counts[entity_type]),
            "support": true_counts[entity_type],
        }
        for entity_type in sorted(true_counts.keys() | pred_counts.keys())
    }
    micro = _prf(sum(correct_counts.values()), sum(pred_counts.values()), sum(true_counts.values()))
    macro_f1 = sum(stats["f1"] for stats in per_type.values()) / len(per_type) if per_type else 0.0
    return {
        **micro,
        "macro_f1": macro_f1,
        "token_accuracy": correct_tokens / total_tokens if total_tokens else 0.0,
        "num_sentences": len(true_sequences),
        "per_type": per_type,
    }


# Ranking metrics of retrieval (the embed task, llmk evaluate on a BEIR folder), with trec_eval's
# definitions (what BEIR and MTEB report through pytrec_eval): nDCG@10 with linear gains, recall@100 and
# MRR@10, averaged over the judged queries. Names use "_at_" for "@" (flag and file safe). ranx computes the
# same (tests/retrieval checks it on SciFact) but pays ~35 s of numba compiling in every process.
RANKING_METRICS = {"ndcg_at_10": "ndcg@10", "recall_at_100": "recall@100", "mrr_at_10": "mrr@10"}


def ranking_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10, recall@100 and MRR@10 of `run` (query id -> {document id: score}) against `qrels`
    (query id -> {document id: relevance > 0}), averaged over the queries of `qrels`; a query the run
    does not rank scores 0. Ties in score are broken by document id, as trec_eval does."""
    totals = {name: 0.0 for name in RANKING_METRICS}
    for query, relevant in qrels.items():
        ranked = sorted((run.get(query) or {}).items(), key=lambda item: (-item[1], item[0]))
        gains = [relevant.get(document, 0) for document, _ in ranked]
        discounts = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10
        ideal = sorted(relevant.values(), reverse=True)[:10]
        dcg = float(np.dot(gains[:10], discounts[: len(gains[:10])]))
        totals["ndcg_at_10"] += dcg / float(np.dot(ideal, discounts[: len(ideal)]))
        totals["recall_at_100"] += sum(1 for g in gains[:100] if g > 0) / len(relevant)
        first = next((rank for rank, g in enumerate(gains[:10], 1) if g > 0), None)
        totals["mrr_at_10"] += 1.0 / first if first else 0.0
    return {name: total / max(1, len(qrels)) for name, total in totals.items()}


# ------------------------------------------------------------------- relations (SemEval-2010 Task 8)

DIRECTION_SUFFIX = re.compile(r"\(e[12],e[12]\)$")  # the scorer's s/\(e[12],e[12]\)$//
RELATION_MODES = ("directed", "undirected", "labels")


def relation_type(label: str) -> str:
    """The relation type of a directed label: `Cause-Effect(e2,e1)` -> `Cause-Effect`; others unchanged."""
    return DIRECTION_SUFFIX.sub("", label)


def _relation_scores(true: Sequence[str], pred: Sequence[str], other: str, mode: str) -> dict[str, Any]:
    """One of the scorer's three evaluations (semeval2010_task8_scorer-v1.2.pl, `evaluate`).

    mode "directed" is its (9+1)-way evaluation with directionality taken into account (the official one):
    labels are merged into their relation type, a prediction is correct only with the gold label's type
    and direction, and a prediction of the right type in the wrong direction still counts among the type's
    predictions (the scorer's xDIRx column), so it costs precision and recall. "undirected" is the (9+1)-way
    evaluation ignoring direction; "labels" is the (2x9+1)-way evaluation over the directed labels.

    Rows are the types present in the gold labels (as the scorer's, which loops over the answer key);
    macro and micro averages leave `other` out, and predicting `other` for a relation is a miss.
    """
    key = (lambda label: label) if mode == "labels" else relation_type
    gold: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    wrong_direction: Counter[str] = Counter()
    for true_label, pred_label in zip(true, pred):
        t, p = key(true_label), key(pred_label)
        gold[t] += 1
        predicted[p] += 1  # wrong directions included: they are predictions of this type
        if (true_label == pred_label) if mode == "directed" else (t == p):
            correct[t] += 1
        elif t == p:  # directed only: the right type, the wrong direction
            wrong_direction[t] += 1
    rows = {}
    for name in sorted(gold):
        scores = _prf(correct[name], predicted[name], gold[name])
        rows[name] = {**scores, "support": gold[name], "correct": correct[name], "predicted": predicted[name]}
        if mode == "directed":
            rows[name]["wrong_direction"] = wrong_direction[name]
    relations = [name for name in rows if name != other]
    micro = _prf(
        sum(correct[n] for n in relations),
        sum(predicted[n] for n in relations),
        sum(gold[n] for n in relations),
    )
    count = max(1, len(relations))
    return {
        "macro_precision": sum(rows[n]["precision"] for n in relations) / count,
        "macro_recall": sum(rows[n]["recall"] for n in relations) / count,
        "macro_f1": sum(rows[n]["f1"] for n in relations) / count,  # the mean of the F1s, as the scorer
        **{f"micro_{k}": v for k, v in micro.items()},
        "rows": rows,
    }


def relation_report(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], other: str = "Other"
) -> dict[str, Any]:
    """SemEval-2010 Task 8's official score and the scorer's other figures, as plain JSON types.

    The official score (`official_macro_f1`) is the macro-averaged F1 over the relation types (9 in
    SemEval-2010 Task 8) with direction taken into account and `other` excluded: per type (both directions
    merged) P = correct / all predictions of the type (wrong directions included), R = correct / gold
    examples of the type, F1 per type, then the unweighted mean of the F1s. Scores are fractions (0-1); the
    scorer prints percentages.

    Args:
        y_true: the gold label id of each example; ids index into `labels`.
        y_pred: the predicted label id of each example.
        labels: the label names, e.g. `Cause-Effect(e1,e2)`, `Cause-Effect(e2,e1)`, ..., `Other`.
        other: the label of "no relation", left out of the averages.

    Returns:
        {"official_macro_f1", "macro_precision", "macro_recall", "micro_precision", "micro_recall",
        "micro_f1" (all directed, `other` excluded), "accuracy" (exact label, `other` included),
        "undirected_macro_f1" ((9+1)-way ignoring direction), "label_macro_f1" ((2x9+1)-way over the
        directed labels), "num_examples", "other_label", "per_relation": {type: {"precision", "recall",
        "f1", "support", "correct", "predicted", "wrong_direction"}} (the official evaluation's rows,
        `other` among them but not averaged), "labels", "confusion_matrix" (directed labels, rows = true),
        "confused_pairs"}.

    Raises:
        InputError: as `classification_report` (lengths differ, an id out of range, no labels).
    """
    basic = classification_report(y_true, y_pred, labels)
    names = basic["labels"]
    true = [names[i] for i in np.asarray(y_true, dtype=np.int64).reshape(-1)]
    pred = [names[i] for i in np.asarray(y_pred, dtype=np.int64).reshape(-1)]
    official = _relation_scores(true, pred, other, "directed")
    return {
        "official_macro_f1": official["macro_f1"],
        "macro_precision": official["macro_precision"],
        "macro_recall": official["macro_recall"],
        "micro_precision": official["micro_precision"],
        "micro_recall": official["micro_recall"],
        "micro_f1": official["micro_f1"],
        "accuracy": basic["accuracy"],
        "undirected_macro_f1": _relation_scores(true, pred, other, "undirected")["macro_f1"],
        "label_macro_f1": _relation_scores(true, pred, other, "labels")["macro_f1"],
        "num_examples": basic["num_examples"],
        "other_label": other,
        "per_relation": official["rows"],
        "labels": names,
        "confusion_matrix": basic["confusion_matrix"],
        "confused_pairs": basic["confused_pairs"],
    }


# ------------------------------------------------------------------------------------------ translation


def translation_scores(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "auto") -> dict:
    """Corpus BLEU and chrF (sacreBLEU, one reference per sentence) with their signatures.

    `tokenize` "auto" is sacreBLEU's "zh" for Chinese references (most characters CJK) and "13a" (its
    default, what WMT reports for English) otherwise.
    """
    import sacrebleu

    if tokenize == "auto":
        text = "".join(references)
        cjk = sum("\u4e00" <= c <= "\u9fff" for c in text)
        tokenize = "zh" if cjk > 0.3 * max(1, len(text.replace(" ", ""))) else "13a"
    bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
    chrf = sacrebleu.metrics.CHRF()
    hypotheses, references = list(hypotheses), [list(references)]
    return {
        "bleu": bleu.corpus_score(hypotheses, references).score,
        "chrf": chrf.corpus_score(hypotheses, references).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
