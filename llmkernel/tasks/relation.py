"""`relation`: relation classification between two marked entities (SemEval-2010 Task 8 and the like).

Each example is a sentence with two entities, marked inline (`The <e1>audits</e1> were about
<e2>waste</e2>.`, SemEval's own format) or given as character spans (`"e1": [start, end]`, `"e2": [start,
end]` into the unmarked text, which this task marks the same way), and a directed label such as
`Message-Topic(e1,e2)` or `Other`. The markers are added to the tokenizer as special tokens and the model
(`models.relation.EncoderForRelationClassification`) classifies the concatenated hidden states at the two
entity-start markers, as "Matching the Blanks" (Baldini Soares et al. 2019) does; see that file.

The metric is SemEval-2010 Task 8's official score (`tasks.metrics.relation_report`): macro-F1 over the
relation types, direction taken into account, `Other` left out; eval.json and the printed report also
hold the per-relation table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkernel.errors import InputError
from llmkernel.io.tables import LABEL_COLUMNS, TEXT_COLUMNS, Table, read_rows
from llmkernel.models.relation import ENTITY_MARKERS
from llmkernel.tasks import report as reports
from llmkernel.tasks.base import SupervisedTask, default_max_length, read_train_and_eval
from llmkernel.tasks.classify import Classify
from llmkernel.tasks.metrics import relation_report

OTHER_LABELS = ("Other", "other", "no_relation", "NA")  # the "no relation" label, left out of the averages
MARKER_PATTERN = re.compile(r"</?e[12]>")
INLINE_HELP = "mark both entities inline (<e1>..</e1> and <e2>..</e2>) or give e1/e2 character spans"


# ------------------------------------------------------------------------------------- entity marking


def check_marked(text: str) -> None:
    """Raise ValueError unless `text` holds exactly one <e1>..</e1> and one <e2>..</e2>, not nested into
    each other and not empty."""
    for entity in ("e1", "e2"):
        opens, closes = text.count(f"<{entity}>"), text.count(f"</{entity}>")
        if opens == 0 or closes == 0:
            missing = f"<{entity}>" if opens == 0 else f"</{entity}>"
            raise ValueError(f"no {missing} marker; {INLINE_HELP}")
        if opens > 1 or closes > 1:
            raise ValueError(f"{max(opens, closes)} <{entity}> markers; mark each entity once")
    spans = {e: (text.index(f"<{e}>"), text.index(f"</{e}>")) for e in ("e1", "e2")}
    for entity, (start, end) in spans.items():
        if end < start:
            raise ValueError(f"</{entity}> comes before <{entity}>; open the entity before closing it")
        if not MARKER_PATTERN.sub("", text[start + 4 : end]).strip():
            raise ValueError(f"the entity <{entity}> is empty; mark at least one character")
    (a, b), (c, d) = spans["e1"], spans["e2"]
    if a < d and c < b:
        raise ValueError("the entities <e1> and <e2> overlap; mark two separate spans")


def mark_spans(text: str, e1: Sequence[int], e2: Sequence[int]) -> str:
    """`text` with <e1>..</e1> and <e2>..</e2> inserted around the character spans [start, end).

    Raises ValueError for a span that is out of range, empty, or overlaps the other, or for a text that
    already holds markers."""
    if MARKER_PATTERN.search(text):
        raise ValueError("the text already holds entity markers; give either inline markers or spans")
    spans = {}
    for name, span in (("e1", e1), ("e2", e2)):
        if not (isinstance(span, list | tuple) and len(span) == 2 and all(type(x) is int for x in span)):
            raise ValueError(f"{name} must be [start, end], two character offsets, got {span!r}")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise ValueError(
                f"{name} span [{start}, {end}) is out of range for a text of {len(text)} characters "
                "(0 <= start < end <= length)"
            )
        spans[name] = (start, end)
    (a, b), (c, d) = spans["e1"], spans["e2"]
    if a < d and c < b:
        raise ValueError(f"the spans e1 [{a}, {b}) and e2 [{c}, {d}) overlap; give two separate spans")
    inserts = sorted([(a, "<e1>"), (b, "</e1>"), (c, "<e2>"), (d, "</e2>")], key=lambda item: item[0])
    out, last = [], 0
    for position, marker in inserts:
        out += [text[last:position], marker]
        last = position
    return "".join(out + [text[last:]])


def strip_markers(text: str) -> str:
    """The sentence without its entity markers (README of semeval2010_task8)."""
    return MARKER_PATTERN.sub("", text)


@dataclass
class MarkerIds:
    """Token ids of the four markers, in the order of ENTITY_MARKERS."""

    e1_start: int
    e1_end: int
    e2_start: int
    e2_end: int

    @property
    def starts(self) -> list[int]:
        return [self.e1_start, self.e2_start]


def add_markers(tokenizer) -> MarkerIds:
    """Add the entity markers to `tokenizer` as special tokens (never split, never lower-cased); a
    tokenizer that has them already keeps its ids."""
    tokenizer.add_tokens(list(ENTITY_MARKERS), special_tokens=True)
    return marker_ids(tokenizer)


def marker_ids(tokenizer) -> MarkerIds:
    """The marker ids of a tokenizer that has them; InputError for one that does not."""
    ids = tokenizer.convert_tokens_to_ids(list(ENTITY_MARKERS))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise InputError(
            f"the tokenizer has no entity marker tokens {' '.join(ENTITY_MARKERS)}; "
            "use a model folder written by llmk finetune relation"
        )
    return MarkerIds(*ids)


def encode_marked(
    tokenizer, texts: Sequence[str], max_length: int, markers: MarkerIds
) -> list[dict[str, Any]]:
    """Token ids and the two entity-start positions of marked texts, at most `max_length` tokens.

    A longer text is cut to a window around its entities rather than at its end, so both start markers
    always survive: the window that holds both entities whole if it fits, else the text around each one.
    Returns [{"input_ids", "entity_positions": [position of <e1>, position of <e2>]}].
    """
    frame = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    frame.discard(None)
    encoded = tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False)["input_ids"]
    examples = []
    for ids in encoded:
        if len(ids) > max_length:
            ids = _crop(ids, max_length, markers, frame)
        examples.append({"input_ids": ids, "entity_positions": [ids.index(i) for i in markers.starts]})
    return examples


def _crop(ids: list[int], max_length: int, markers: MarkerIds, frame: set[int]) -> list[int]:
    lead = 1 if ids[0] in frame else 0
    tail = 1 if ids[-1] in frame else 0
    body, room = ids[lead : len(ids) - tail], max_length - lead - tail
    marks = [body.index(i) for i in (markers.e1_start, markers.e1_end, markers.e2_start, markers.e2_end)]
    first, last = min(marks), max(marks)
    a, b = sorted((marks[0], marks[2]))  # the two start markers
    if last - first + 1 <= room:  # both entities fit whole: a window centred on them
        start = max(0, min(len(body) - room, (first + last + 1 - room) // 2))
        kept = body[start : start + room]
    elif b - a < room:  # both start markers fit: a window from the first one on
        start = min(a, len(body) - room)
        kept = body[start : start + room]
    else:  # too far apart: the text from the first start marker on, and a window holding the second
        half = room // 2
        second = max(a + half, min(b, len(body) - (room - half)))
        kept = body[a : a + half] + body[second : second + room - half]
    return ids[:lead] + kept + ids[len(ids) - tail :]


# ---------------------------------------------------------------------------------------------- files


@dataclass
class RelationData:
    """Marked texts (inline markers) and their labels, read from a table file."""

    texts: list[str]
    labels: list[str] | None
    path: str

    def __len__(self) -> int:
        return len(self.texts)


def _detect(table: Table, candidates: Sequence[str]) -> str | None:
    return next((column for column in candidates if column in table.columns), None)


def _span(table: Table, index: int, name: str) -> list[int] | None:
    row = table.rows[index]
    value = row.get(name)
    if value is None and f"{name}_start" in row:  # csv/tsv: e1_start, e1_end columns
        value = [row.get(f"{name}_start"), row.get(f"{name}_end")]
    if isinstance(value, dict):
        value = [value.get("start"), value.get("end")]
    if value is None:
        return None
    try:
        return [int(x) for x in value]
    except (TypeError, ValueError):
        raise InputError(
            f"{table.where(index)}: {name} must be [start, end] character offsets, got {value!r}"
        ) from None


def read_relations(path: str | Path, limit: int = 0, require_labels: bool = True) -> RelationData:
    """Read a relation file: jsonl (or csv/tsv/json/parquet) rows with a text, a label and the entities,
    marked inline or as character spans `e1`/`e2` ([start, end) into the unmarked text).

    Raises:
        InputError: a row without a text or label, or whose entities are missing, out of range or
        overlapping (named by its line).
    """
    table = read_rows(Path(path))
    text_column = _detect(table, TEXT_COLUMNS)
    if text_column is None:
        raise InputError(
            f"{path}: no text column (looked for {', '.join(TEXT_COLUMNS)}); columns are: "
            f"{', '.join(table.columns)}"
        )
    label_column = _detect(table, (*LABEL_COLUMNS, "relation"))
    if label_column is None and require_labels:
        raise InputError(
            f"{path}: no label column (looked for label, relation); columns are: {', '.join(table.columns)}"
        )
    count = min(limit, len(table.rows)) if limit > 0 else len(table.rows)
    texts, labels = [], []
    for index in range(count):
        row = table.rows[index]
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise InputError(
                f"{table.where(index)}: empty or missing {text_column!r}; fill it in or remove the row"
            )
        e1, e2 = _span(table, index, "e1"), _span(table, index, "e2")
        try:
            if e1 is not None or e2 is not None:
                if e1 is None or e2 is None:
                    raise ValueError(f"only {'e1' if e2 is None else 'e2'} has a span; give both e1 and e2")
                text = mark_spans(text, e1, e2)
            else:
                check_marked(text)
        except ValueError as error:
            raise InputError(f"{table.where(index)}: {error}") from None
        texts.append(text)
        if label_column is not None:
            label = row.get(label_column)
            label = str(label) if isinstance(label, int) and not isinstance(label, bool) else label
            if not isinstance(label, str) or not label.strip():
                raise InputError(
                    f"{table.where(index)}: empty or missing label {label_column!r} (a text such as "
                    "Cause-Effect(e1,e2) or Other)"
                )
            labels.append(label.strip())
    return RelationData(texts, labels if label_column is not None else None, str(path))


# ----------------------------------------------------------------------------------------------- task


class RelationClassify(SupervisedTask):
    """Relation classification: cross-entropy over directed labels from the entity-start states."""

    name = "relation"
    model_kind = "relation_classifier"
    peft_task_type = None  # a plain PeftModel: the forward passes entity_positions through
    default_metric = "official_macro_f1"
    metrics = ("official_macro_f1", "micro_f1", "accuracy", "loss")
    headline = ("official_macro_f1", "micro_f1", "accuracy", "undirected_macro_f1")
    attackable = False

    def __init__(self, tokenizer, labels: list[str], max_length: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(tokenizer, max_length, batch_size, seed)
        self.labels = labels
        self.label_ids = {name: i for i, name in enumerate(labels)}
        self.other = next((name for name in OTHER_LABELS if name in labels), "")
        self.markers = marker_ids(tokenizer)

    @property
    def names(self) -> list[str]:
        return self.labels

    def wants_class_weights(self, setting: str) -> bool:
        """Only when asked ("true"): SemEval's rarest label has 1 example (a weight of ~400 under
        inverse frequency) and the official score averages over types, not labels."""
        return setting == "true"

    @classmethod
    def from_training_files(
        cls, tokenizer, model_config, data: Any, seed: int, batch_size: int, max_length: int
    ):
        """The task with `data.train` (and `data.eval`, or a held-out share) read and encoded; the entity
        markers are added to `tokenizer` (which finetune saves beside the model)."""
        train, evaluation = read_train_and_eval(lambda path: _as_rows(read_relations(path)), data, seed)
        labels = sorted({label for _, label in train})
        unseen = sorted({label for _, label in evaluation} - set(labels))
        if unseen:
            raise InputError(
                f"labels in {data.eval or data.train} missing from the training data: "
                f"{', '.join(map(repr, unseen[:5]))}; every evaluation label must occur in training"
            )
        if len(labels) < 2:
            raise InputError(f"{data.train}: only one label ({labels[0]!r}); relations need two or more")
        markers = add_markers(tokenizer)
        if not max_length:
            counted = [
                len(e["input_ids"])
                for e in encode_marked(tokenizer, [t for t, _ in train[:20000]], 10**6, markers)
            ]
            max_length = default_max_length(counted, model_config, data.train)
        task = cls(tokenizer, labels, max_length, batch_size, seed)
        task.set_train(task.encode([t for t, _ in train], [label for _, label in train]))
        task.eval = task.encode([t for t, _ in evaluation], [label for _, label in evaluation])
        return task

    @classmethod
    def for_evaluation(
        cls, path: str, model, tokenizer, max_length: int, batch_size: int, columns: dict, limit: int
    ):
        """The task with the labels the model knows and `path`'s examples as its evaluation set."""
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        data = read_relations(path, limit=limit)
        unknown = sorted(set(data.labels) - set(labels))
        if unknown:
            raise InputError(
                f"labels in {path} unknown to the model: {', '.join(map(repr, unknown[:5]))}; "
                f"the model knows {', '.join(map(repr, labels[:10]))}"
            )
        task = cls(tokenizer, labels, max_length, batch_size)
        if task.markers.starts != list(model.config.entity_start_ids):
            raise InputError(
                f"the tokenizer's marker ids {task.markers.starts} are not the model's "
                f"{model.config.entity_start_ids}; keep the tokenizer saved with the model"
            )
        task.eval = task.encode(data.texts, data.labels)
        return task

    def new_head(self) -> dict[str, Any]:
        """The label settings, plus what a fresh relation model needs from the tokenizer."""
        return {
            **super().new_head(),
            "entity_start_ids": self.markers.starts,
            "vocab_size": len(self.tokenizer),
        }

    def encode(self, texts: Sequence[str], labels: Sequence[str]) -> list[dict[str, Any]]:
        examples = encode_marked(self.tokenizer, texts, self.max_length, self.markers)
        for example, label in zip(examples, labels):
            example["labels"] = self.label_ids[label]
        return examples

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().collate([{k: v for k, v in e.items() if k != "entity_positions"} for e in examples])
        batch["entity_positions"] = torch.tensor([e["entity_positions"] for e in examples], dtype=torch.long)
        return batch

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "token_type_ids", "entity_positions")
        return {k: v for k, v in batch.items() if k in keys}

    # classify's cross-entropy (class-weighted when asked) and argmax; model_inputs above adds the markers
    loss = Classify.loss
    predict = Classify.predict
    write_figures = Classify.write_figures  # the confusion matrix

    def report(
        self, model: torch.nn.Module, device: torch.device, examples: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        examples = self.eval if examples is None else examples
        predictions, total = self.predict(model, examples, device)
        report = relation_report(
            [e["labels"] for e in examples], predictions.tolist(), self.labels, self.other
        )
        report["loss"] = total / max(1, len(examples))
        return report

    def format_report(self, report: dict[str, Any]) -> str:
        return format_relation_report(report)


def _as_rows(data: RelationData) -> list[tuple[str, str]]:
    return list(zip(data.texts, data.labels))


def format_relation_report(report: dict[str, Any]) -> str:
    """The scorer's per-relation table (directed, wrong directions counted), then the averages, the
    official score on its own line, and the most confused label pairs."""
    rows = report["per_relation"]
    width = max(len("micro avg (excl. other)"), *(len(name) for name in rows))
    header = (
        f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}  {'wrong dir':>9}"
    )
    lines = [header, ""]
    for name, stats in rows.items():
        shown = f"{name} (not averaged)" if name == report["other_label"] else name
        row = reports.score_row(
            width, shown, stats["precision"], stats["recall"], stats["f1"], stats["support"]
        )
        lines.append(f"{row}  {stats['wrong_direction']:>9}")
    relations = sum(stats["support"] for name, stats in rows.items() if name != report["other_label"])
    lines.append("")
    lines.append(
        reports.score_row(
            width,
            "micro avg (excl. other)",
            report["micro_precision"],
            report["micro_recall"],
            report["micro_f1"],
            relations,
        )
    )
    lines.append(
        reports.score_row(
            width,
            "macro avg (excl. other)",
            report["macro_precision"],
            report["macro_recall"],
            report["official_macro_f1"],
            relations,
        )
    )
    lines.append("")
    lines.append(
        f"official score (SemEval-2010 Task 8, (9+1)-way with direction, macro-F1 excluding Other): "
        f"{report['official_macro_f1']:.4f}"
    )
    lines.append(
        f"accuracy {report['accuracy']:.4f} over {report['num_examples']} examples; undirected macro-F1 "
        f"{report['undirected_macro_f1']:.4f}; macro-F1 over the directed labels {report['label_macro_f1']:.4f}"
    )
    pairs = report.get("confused_pairs") or []
    if pairs:
        lines += ["", "most confused pairs (true -> predicted: errors, share of the true label's examples)"]
        lines += [f"  {p['true']} -> {p['predicted']}: {p['count']} ({p['share']:.0%})" for p in pairs]
    return "\n".join(lines)
