"""Labeled data readers: every table format, column detection, labels, CoNLL tags, chat records, and errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmkernel.errors import InputError
from llmkernel.io.chat import read_chat
from llmkernel.io.conll import TaggedSentence, read_conll, tag_names
from llmkernel.io.tables import ClassificationData, label_names, read_classification, read_table


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *records: object) -> Path:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


# ------------------------------------------------------------------------------------------- tables


def test_read_table_csv_tsv_jsonl_json_parquet_and_gzip(tmp_path):
    expected = [{"text": "good film", "label": "1"}, {"text": 'a "quoted", bit', "label": "0"}]
    csv_path = write(tmp_path / "a.csv", 'text,label\ngood film,1\n"a ""quoted"", bit",0\n')
    assert read_table(csv_path) == expected
    # tsv: bare quotes are data (QUOTE_NONE), as in SST-2
    tsv_path = write(tmp_path / "a.tsv", 'label\ttext\n1\tgood film\n0\ta "quoted", bit\n')
    assert read_table(tsv_path) == expected
    assert read_table(jsonl(tmp_path / "a.jsonl", *expected)) == expected
    assert read_table(write(tmp_path / "a.json", json.dumps(expected))) == expected
    pq.write_table(pa.Table.from_pylist(expected), tmp_path / "a.parquet")
    assert read_table(tmp_path / "a.parquet") == expected
    with gzip.open(tmp_path / "b.csv.gz", "wt") as handle:
        handle.write("text,label\ngood film,1\n")
    assert read_table(str(tmp_path / "b.csv.gz")) == expected[:1]


def test_read_table_skips_blank_lines_and_byte_order_mark(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes("\ufefftext,label\r\n\r\nhi,1\r\n".encode())
    assert read_table(path) == [{"text": "hi", "label": "1"}]
    assert read_table(write(tmp_path / "b.jsonl", '\n{"a": 1}\n\n')) == [{"a": 1}]


def test_read_table_json_lines_saved_as_json(tmp_path):
    assert read_table(write(tmp_path / "a.json", '{"a": 1}\n{"a": 2}\n')) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.xlsx", "x", "unknown file type '.xlsx'; use one of .csv, .json, .jsonl"),
        ("a.csv", "", "no rows"),
        ("a.csv", "text,label\n", "no rows"),
        ("a.jsonl", "\n\n", "no rows"),
        ("a.json", "[]", "no rows"),
        ("a.csv", "text,label\nok,1\ntoo,many,2\n", "a.csv line 3: 3 fields, the header has 2"),
        ("a.tsv", "text\tlabel\nok\t1\nshort\n", "a.tsv line 3: 1 fields, the header has 2"),
        ("a.csv", "text,text\nok,1\n", "a.csv line 1: duplicate column 'text'"),
        ("a.jsonl", '{"a": 1}\n{"a": \n', "a.jsonl line 2: not valid JSON"),
        ("a.jsonl", '{"a": 1}\n\n[1, 2]\n', "a.jsonl line 3: expected a JSON object, found list"),
        ("a.json", '[{"a": 1},\n {"a": }]', "a.json line 2: not valid JSON"),
        ("a.json", '{"a": 1}', "expected a list of objects, found a JSON dict"),
        ("a.json", '[{"a": 1}, 3]', "a.json row 2: expected a JSON object, found int"),
        ("a.parquet", "not parquet", "not a readable parquet file"),
    ],
)
def test_read_table_errors(tmp_path, name, content, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_table(write(tmp_path / name, content))


def test_read_table_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(InputError, match="nope.csv: no such file"):
        read_table(tmp_path / "nope.csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(InputError, match="latin1.csv line 2: not UTF-8 text"):
        read_table(path)


# ----------------------------------------------------------------------------------- classification


def test_read_classification_detects_columns_and_normalizes_labels(tmp_path):
    path = jsonl(
        tmp_path / "nli.jsonl",
        {"premise_id": 1, "sentence1": "a", "sentence2": "b", "labels": 2},
        {"premise_id": 2, "sentence1": "c", "sentence2": "d", "labels": 10.0},
        {"premise_id": 3, "sentence1": "e", "sentence2": "f", "labels": " neutral "},
    )
    data = read_classification(path)
    assert data == ClassificationData(
        texts=["a", "c", "e"],
        pairs=["b", "d", "f"],
        labels=["2", "10", "neutral"],
        text_column="sentence1",
        pair_column="sentence2",
        label_column="labels",
        path=str(path),
    )


def test_read_classification_named_columns_limit_and_no_pair(tmp_path):
    path = write(tmp_path / "a.csv", "body,stars,sentence\nx,5,s1\ny,4,s2\nz,,s3\n")
    data = read_classification(path, text_column="body", label_column="stars", limit=2)
    assert (data.texts, data.labels, data.pairs, data.pair_column) == (["x", "y"], ["5", "4"], None, None)


def test_read_classification_parquet_float_labels(tmp_path):
    rows = [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert read_classification(tmp_path / "a.parquet").labels == ["1", "0"]


def test_read_classification_without_labels(tmp_path):
    path = write(tmp_path / "predict.csv", "text\nhello\n")
    data = read_classification(path, require_labels=False)
    assert (data.texts, data.labels, data.label_column) == (["hello"], None, None)
    with pytest.raises(
        InputError, match=r"no label column found .*columns are: text \(set --data.label_column\)"
    ):
        read_classification(path)


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        (
            "body,label\nx,1\n",
            {},
            r"no text column found \(looked for text, sentence.*columns are: body, label "
            r"\(set --data.text_column\)",
        ),
        (
            "text,label\nx,1\n",
            {"text_column": "txt"},
            r"no text column 'txt'; columns are: text, label "
            r"\(set --data.text_column\)",
        ),
        (
            "text,label\nx,1\n",
            {"label_column": "labl"},
            r"no label column 'labl'; columns are: text, label "
            r"\(set --data.label_column\)",
        ),
        ("text,label\nx,1\n", {"pair_column": "second"}, r"no pair column 'second'.*--data.pair_column"),
        ("text,label\nx,1\n ,0\n", {}, r"a.csv row 2 \(line 3\): empty 'text'"),
        ("text,label\nx,1\n\ny,\n", {}, r"a.csv row 2 \(line 4\): empty label 'label'"),
    ],
)
def test_read_classification_errors(tmp_path, content, options, message):
    with pytest.raises(InputError, match=message):
        read_classification(write(tmp_path / "a.csv", content), **options)


def test_read_classification_jsonl_errors_name_the_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "x", "label": 1}\n\n{"label": 0}\n')
    with pytest.raises(InputError, match=r"a.jsonl line 3: empty 'text'"):
        read_classification(path)
    path = jsonl(tmp_path / "b.jsonl", {"text": "x", "label": None})
    with pytest.raises(InputError, match=r"b.jsonl line 1: empty label"):
        read_classification(path)
    path = jsonl(tmp_path / "c.jsonl", {"text": 5, "label": 1})
    with pytest.raises(InputError, match=r"c.jsonl line 1: 'text' is a int, expected text"):
        read_classification(path)


def test_label_names_sorting_and_unseen_eval_labels():
    assert label_names(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_names(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]
    assert label_names(["b", "10", "2"]) == ["10", "2", "b"]  # not all numeric: as strings
    assert label_names(["0", "1"], ["1", "0"], "dev.tsv") == ["0", "1"]
    message = r"labels in dev.tsv missing from the training data: 'x', 'y'; every evaluation label must occur"
    with pytest.raises(InputError, match=message):
        label_names(["a", "b"], ["a", "y", "x"], "dev.tsv")
    with pytest.raises(InputError, match=r"'c', 'd', 'e', 'f', 'g' and 2 more;"):
        label_names(["a"], list("cdefghi"), "dev.tsv")


# -------------------------------------------------------------------------------------------- CoNLL


def test_read_conll_tabs_spaces_docstart_and_tag_names(tmp_path):
    text = "-DOCSTART-\tO\n\nEmpire\tB-location\nState\tI-location\nis\tO\n\t\n\nBob\tB-person \n"
    sentences = read_conll(write(tmp_path / "a.conll", text))
    assert sentences == [
        TaggedSentence(["Empire", "State", "is"], ["B-location", "I-location", "O"], 3),
        TaggedSentence(["Bob"], ["B-person"], 8),
    ]
    # CoNLL-2003 shape: space separated, token first, tag last, BIOES tags
    text = "EU NNP B-NP S-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\nBlack NNP I-NP E-PER\n"
    sentences = read_conll(write(tmp_path / "b.conll", text))
    assert [s.tokens for s in sentences] == [["EU", "rejects"], ["Peter", "Black"]]
    assert tag_names(sentences) == ["O", "S-ORG", "B-PER", "E-PER"]
    tagged = [TaggedSentence(["a"] * 5, ["I-x", "O", "B-y", "B-x", "S-x"], 1)]
    assert tag_names(tagged) == ["O", "B-x", "I-x", "S-x", "B-y"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "a\tO\nb\tO\tO\n",
            r"a.conll line 2: expected 2 fields \(token and tag\) separated by a tab, found 3",
        ),
        (
            "a b c O\n\nb O\n",
            r"a.conll line 3: expected 4 fields \(token first, tag last\) separated by spaces",
        ),
        (
            "a\tO\n\nlonely\n",
            r"a.conll line 3: expected 2 fields \(token and tag\) separated by a tab, found 1",
        ),
        ("a\tO\nb\tPER\n", r"a.conll line 2: tag 'PER' is not O or B-/I-/E-/S- followed by a type"),
        ("a\tO\nb\tB-\n", r"a.conll line 2: tag 'B-'"),
        ("a\tO\n\tO\n", r"a.conll line 2: empty token"),
        ("", r"a.conll: no sentences"),
        ("-DOCSTART- -X- O O\n\n\n", r"a.conll: no sentences"),
    ],
)
def test_read_conll_errors(tmp_path, content, message):
    with pytest.raises(InputError, match=message):
        read_conll(write(tmp_path / "a.conll", content))


def test_read_conll_missing_file(tmp_path):
    with pytest.raises(InputError, match="train.conll: no such file"):
        read_conll(tmp_path / "train.conll")


# --------------------------------------------------------------------------------------------- chat


def test_read_chat_three_shapes(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "name": "bot"},
    ]
    path = jsonl(
        tmp_path / "chat.jsonl",
        {"messages": messages},
        {"prompt": "2+2?", "response": "4"},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    )
    assert read_chat(path) == [
        [{"role": m["role"], "content": m["content"]} for m in messages],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]
    path = write(tmp_path / "chat.json", json.dumps([{"prompt": "a", "response": "b"}]))
    assert read_chat(path) == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], r"line 2: expected a JSON object, found list"),
        (
            {"question": "q", "answer": "a"},
            r"line 2: unknown record shape \(keys: 'question', 'answer'\); "
            r"expected \"messages\".*\"prompt\" \+ \"response\".*\"instruction\"",
        ),
        ({"messages": "hi"}, r"line 2: 'messages' must be a list"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            r"line 2: message 1 has role 'bot'; roles are system",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
            r"line 2: message 2 content is int, expected a string",
        ),
        ({"messages": ["hi"]}, r"line 2: message 1 is a str"),
        ({"messages": [{"role": "user", "content": "q"}]}, r"line 2: no assistant message"),
        ({"messages": []}, r"line 2: no assistant message"),
        ({"prompt": "q", "response": None}, r"line 2: 'response' content is NoneType, expected a string"),
        ({"instruction": "q", "input": 3, "output": "a"}, r"line 2: 'input' is a int"),
    ],
)
def test_read_chat_errors(tmp_path, record, message):
    path = jsonl(tmp_path / "chat.jsonl", {"prompt": "ok", "response": "ok"}, record)
    with pytest.raises(InputError, match=message):
        read_chat(path)


# ---------------------------------------------------------------------------------------- real data


def test_real_shared_data(shared_data):
    sst2 = shared_data / "sst2" / "train.tsv"
    rows = read_table(sst2)
    assert len(rows) == 67_349 and list(rows[0]) == ["label", "sentence"]
    data = read_classification(sst2, limit=8000)
    assert (len(data.texts), data.text_column, data.label_column) == (8000, "sentence", "label")
    assert label_names(data.labels, read_classification(shared_data / "sst2" / "dev.tsv").labels) == [
        "0",
        "1",
    ]
    counts = {}
    for split in ("train", "dev", "test"):
        sentences = read_conll(shared_data / "wnut17_ner" / f"{split}.conll")
        counts[split] = (len(sentences), sum(len(sentence.tokens) for sentence in sentences))
    assert counts == {"train": (3394, 62_730), "dev": (1009, 15_733), "test": (1287, 23_394)}
    assert len(tag_names(read_conll(shared_data / "wnut17_ner" / "train.conll"))) == 13
