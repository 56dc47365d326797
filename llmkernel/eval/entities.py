"""Entity-level NER metrics, the same as seqeval's default mode (conlleval chunking) for IOB2 and BIOES tags.

An entity is a chunk (type, start, end); a predicted entity counts as correct only when a true entity has
the same type, start and end. Chunking follows conlleval (and seqeval's `get_entities`): `B-X` and `S-X`
always start a chunk, `I-X` or `E-X` continue a chunk of type X and start a new one after `O`, after
`E-`/`S-` or after a different type, and `E-X`/`S-X` close their chunk. `O` and any tag without a
`B-`/`I-`/`E-`/`S-` prefix are outside every chunk. (seqeval would read a bare `PER` as tag `P`, type `ER`;
treating it as outside is the one deliberate difference.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

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


def format_entity_report(report: dict[str, Any]) -> str:
    """A seqeval-style table: one row per entity type, then the micro and macro averages."""
    per_type = report["per_type"]
    width = max(len("micro avg"), *(len(name) for name in per_type)) if per_type else len("micro avg")
    total = sum(stats["support"] for stats in per_type.values())

    def row(name: str, precision: float | str, recall: float | str, f1: float, support: int) -> str:
        cells = [
            f"{value:>9.4f}" if isinstance(value, float) else f"{value:>9}" for value in (precision, recall)
        ]
        return f"{name:>{width}}  {cells[0]}  {cells[1]}  {f1:>9.4f}  {support:>9}"

    lines = [f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}", ""]
    for name, stats in per_type.items():
        lines.append(row(name, stats["precision"], stats["recall"], stats["f1"], stats["support"]))
    lines.append("")
    lines.append(row("micro avg", report["precision"], report["recall"], report["f1"], total))
    lines.append(row("macro avg", "", "", report["macro_f1"], total))
    lines.append("")
    lines.append(f"token accuracy {report['token_accuracy']:.4f} over {report['num_sentences']} sentences")
    return "\n".join(lines)
