from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llmkernel.data.config import InputSpec
from llmkernel.data.readers import BUILTIN_DEMO, ReadStats, read_documents, resolve_inputs
from llmkernel.errors import InputError


def read(spec: InputSpec, strict: bool = False) -> tuple[list, ReadStats]:
    stats = ReadStats()
    docs = [d for s, p in resolve_inputs([spec]) for d in read_documents(s, p, stats, strict)]
    return docs, stats


def test_txt_split_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nline two\n\n\nsecond para\n\nthird\n")
    whole, _ = read(InputSpec(path=str(path)))
    assert len(whole) == 1 and whole[0].text.startswith("first para")
    paragraphs, _ = read(InputSpec(path=str(path), split="paragraph"))
    assert [d.text.strip() for d in paragraphs] == ["first para\nline two", "second para", "third"]
    assert paragraphs[1].id == f"{path}:5"
    lines, stats = read(InputSpec(path=str(path), split="line"))
    assert [d.text for d in lines] == ["first para", "line two", "second para", "third"]
    assert stats.empty_records == 3


def test_jsonl_malformed_lines_counted_with_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\nnot json\n{"text": 5}\n[1, 2]\n{"text": "two", "id": "x"}\n')
    docs, stats = read(InputSpec(path=str(path)))
    assert [d.text for d in docs] == ["one", "two"]
    assert docs[1].id == f"{path}:x"
    assert stats.malformed_records == 3
    assert stats.malformed_examples[0].startswith(f"{path}:2: not valid JSON")
    with pytest.raises(InputError, match=":2: not valid JSON"):
        read(InputSpec(path=str(path)), strict=True)


def test_jsonl_html_field_and_wrong_field(tmp_path):
    path = tmp_path / "pages.jsonl"
    path.write_text(json.dumps({"url": "u", "html": "<p>hi</p>"}) + "\n")
    docs, _ = read(InputSpec(path=str(path)))
    assert docs[0].html and docs[0].text == "<p>hi</p>"
    with pytest.raises(InputError, match="no field 'body'; records have: url, html"):
        read(InputSpec(path=str(path), text_field="body"))
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"a": 1}\n')
    with pytest.raises(InputError, match="no text field found"):
        read(InputSpec(path=str(plain)))


def test_json_list_csv_tsv_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"content": "c1"}, {"content": "c2"}]}))
    (tmp_path / "b.csv").write_text('id,text\n1,"hello, world"\n2,bad,row\n3,bye\n')
    (tmp_path / "c.tsv").write_text("label\tsentence\n0\tit 's fine\n")
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), tmp_path / "d.parquet")
    docs, stats = read(InputSpec(path=str(tmp_path)))
    assert [d.text for d in docs] == ["c1", "c2", "hello, world", "bye", "it 's fine", "p1", "p2"]
    assert stats.malformed_records == 2  # the csv row with 3 fields, the parquet null
    with pytest.raises(InputError, match="no field 'body'; records have: label, sentence"):
        read(InputSpec(path=str(tmp_path / "c.tsv"), text_field="body"))


def test_compressed_inputs_and_undecodable_bytes(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write('{"text": "gz doc"}\n')
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zst \xff\xfedoc"))
    docs, stats = read(InputSpec(path=str(tmp_path)))
    assert [d.text for d in docs] == ["gz doc", "zst doc"]
    assert stats.undecodable_bytes == 2


def test_html_file_is_marked_html(tmp_path):
    (tmp_path / "p.html").write_text("<html><body><p>x</p></body></html>")
    docs, _ = read(InputSpec(path=str(tmp_path / "p.html")))
    assert docs[0].html


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        resolve_inputs([InputSpec(path=str(tmp_path / "nope.txt"))])
    with pytest.raises(InputError, match="no files match"):
        resolve_inputs([InputSpec(path=str(tmp_path / "*.txt"))])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match="folder has no readable files"):
        resolve_inputs([InputSpec(path=str(tmp_path))])
    with pytest.raises(InputError, match="unknown file type"):
        read(InputSpec(path=str(tmp_path / "notes.md")))
    with pytest.raises(InputError, match="no inputs given"):
        resolve_inputs([])


def test_builtin_demo_corpus():
    docs, stats = read(InputSpec(path=BUILTIN_DEMO))
    assert len(docs) > 100 and stats.bytes > 500_000
    assert any(d.id.endswith("/modules/json") for d in docs)
