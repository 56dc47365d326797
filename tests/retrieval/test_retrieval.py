"""`llmk index` and `llmk evaluate` on retrieval sets: the index folder, exact and HNSW search, BM25, RRF,
the metrics, and bad input through the CLI (one line, exit 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llmkernel.io.beir import read_beir
from llmkernel.retrieval.fusion import reciprocal_rank_fusion
from llmkernel.retrieval.index import Index
from llmkernel.tasks.metrics import ranking_metrics
from tests.conftest import run_llmk


def test_reciprocal_rank_fusion_sums_one_over_k_plus_rank():
    dense = [(7, 0.9), (3, 0.8), (5, 0.1)]
    lexical = [(3, 12.0), (9, 4.0)]
    fused = reciprocal_rank_fusion([dense, lexical], k=60, top=10)
    assert [d for d, _ in fused] == [3, 7, 9, 5]  # 3 is second and first: 1/62 + 1/61
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][1] == pytest.approx(1 / 61) and fused[2][1] == pytest.approx(1 / 62)
    assert len(reciprocal_rank_fusion([dense, lexical], top=2)) == 2


def test_ranking_metrics_of_known_runs():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}}
    perfect = {"q1": {"a": 1.0, "x": 0.5}, "q2": {"b": 1.0, "c": 0.9}}
    assert ranking_metrics(qrels, perfect) == pytest.approx(
        {"ndcg_at_10": 1.0, "recall_at_100": 1.0, "mrr_at_10": 1.0}
    )
    # q1's document second (MRR 1/2, nDCG 1/log2(3)); q2 not ranked at all (zeros)
    half = ranking_metrics(qrels, {"q1": {"x": 1.0, "a": 0.5}})
    assert half["mrr_at_10"] == pytest.approx(0.25) and half["recall_at_100"] == pytest.approx(0.5)
    assert half["ndcg_at_10"] == pytest.approx(0.5 / np.log2(3))


@pytest.mark.e2e  # ranx compiles its numba code for ~35 s in every process
def test_ranking_metrics_equal_ranx_on_random_runs():
    from ranx import Qrels, Run, evaluate

    rng = np.random.default_rng(0)
    documents = [f"d{i}" for i in range(300)]
    qrels = {
        f"q{q}": {d: 1 for d in rng.choice(documents, rng.integers(1, 5), replace=False)} for q in range(50)
    }
    run = {q: {d: float(rng.random()) for d in rng.choice(documents, 120, replace=False)} for q in qrels}
    for q in list(run)[:10]:  # some relevant documents near the top
        run[q].update({d: 2.0 + rng.random() for d in qrels[q]})
    ours = ranking_metrics(qrels, run)
    theirs = evaluate(Qrels(qrels), Run(run), ["ndcg@10", "recall@100", "mrr@10"])
    assert ours == pytest.approx(
        {
            "ndcg_at_10": theirs["ndcg@10"],
            "recall_at_100": theirs["recall@100"],
            "mrr_at_10": theirs["mrr@10"],
        }
    )


def test_index_folder_holds_vectors_ids_texts_and_bm25(tiny_index, tiny_beir):
    index = Index(tiny_index)
    meta = json.loads((tiny_index / "index.json").read_text())
    assert meta["documents"] == len(index) == 24 and meta["pooling"] == "mean" and not meta["approximate"]
    assert index.ids[:2] == ["d0", "d1"] and index.texts[0].startswith("paris ")
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, rtol=1e-5)
    # exact search is the brute-force ranking
    query = index.vectors[5:6]
    hits = index.dense(query, 5)
    assert hits[0][0] == (5, pytest.approx(1.0, abs=1e-5))
    brute = np.argsort(-(index.vectors @ query[0]), kind="stable")[:5]
    assert [d for d, _ in hits[0]] == brute.tolist()
    # BM25: the query's unique word finds its document; an unknown word finds nothing
    assert index.lexical(["paris kax"], 3)[0][0][0] == 0
    assert index.lexical(["zzzz"], 3) == [[]]
    assert len(index.search(["berlin kay"], query, 4, "hybrid")[0]) == 4
    manifest = json.loads((tiny_index / "run.json").read_text())
    assert manifest["stage"] == "index" and manifest["metrics"]["documents"] == 24


def test_index_again_is_up_to_date_and_hnsw_agrees_with_exact(tiny_encoder, tiny_beir, tmp_path, llmk):
    out = tmp_path / "hnsw"
    args = ["index", str(tiny_encoder), str(tiny_beir), "--out", str(out), "--progress", "false"]
    code, _, error = llmk(*args, "--approximate", "true")
    assert code == 0, error
    code, printed, _ = llmk(*args, "--approximate", "true")
    assert code == 0 and "up to date" in printed
    approximate, exact = Index(out), Index(out, approximate=False)
    assert approximate.hnsw is not None and exact.hnsw is None
    queries = exact.vectors[:6]
    assert [[d for d, _ in h] for h in approximate.dense(queries, 3)] == [
        [d for d, _ in h] for h in exact.dense(queries, 3)
    ]


def test_evaluate_an_index_and_an_encoder_gives_dense_bm25_and_hybrid(
    tiny_index, tiny_encoder, tiny_beir, tmp_path, llmk
):
    code, printed, error = llmk(
        "evaluate", str(tiny_index), "--data", str(tiny_beir), "--out", str(tmp_path / "a")
    )
    assert code == 0, error
    assert "ndcg@10" in printed and "hybrid" in printed
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert report["queries"] == 6 and report["documents"] == 24 and report["split"] == "test"
    # every test query holds a word only its own document has: BM25 ranks it first
    assert report["bm25"] == {"ndcg_at_10": 1.0, "recall_at_100": 1.0, "mrr_at_10": 1.0}
    assert 0 < report["dense"]["ndcg_at_10"] <= 1 and report["dense"]["recall_at_100"] == 1.0
    assert report["hybrid"]["ndcg_at_10"] >= report["dense"]["ndcg_at_10"]
    args = [
        "evaluate",
        str(tiny_encoder),
        "--data",
        str(tiny_beir),
        "--out",
        str(tmp_path / "b"),
        "--split",
        "train",
    ]
    code, _, error = llmk(*args)
    assert code == 0, error
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["queries"] == 18


def _broken(tiny_beir, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(tiny_beir, folder)
    return folder


def test_bad_retrieval_sets_are_one_line_and_exit_2(tiny_beir, tiny_encoder, tiny_index, tmp_path, llmk):
    cases = {}
    missing_doc = _broken(tiny_beir, tmp_path, "missing-doc")
    with open(missing_doc / "qrels" / "test.tsv", "a") as handle:
        handle.write("q3\td999\t1\n")
    cases[missing_doc] = "corpus id 'd999'"
    missing_query = _broken(tiny_beir, tmp_path, "missing-query")
    for split in ("test", "train"):
        with open(missing_query / "qrels" / f"{split}.tsv", "a") as handle:
            handle.write("q999\td3\t1\n")
    cases[missing_query] = "query id 'q999'"
    malformed = _broken(tiny_beir, tmp_path, "malformed")
    with open(malformed / "corpus.jsonl", "a") as handle:
        handle.write('{"_id": "d100", "text": \n')
    cases[malformed] = "corpus.jsonl:25: not valid JSON"
    no_corpus = _broken(tiny_beir, tmp_path, "no-corpus")
    (no_corpus / "corpus.jsonl").unlink()
    # one in a real process (its exit code), the others through the same `main` in this one (faster)
    result = run_llmk(
        "evaluate", str(tiny_encoder), "--data", str(missing_doc), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and cases[missing_doc] in result.stderr
    for folder, message in cases.items():
        code, _, error = llmk(
            "evaluate", str(tiny_encoder), "--data", str(folder), "--out", str(tmp_path / "out")
        )
        assert code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "out").exists()  # nothing half-written
    for args, message in (
        (
            ["index", str(tiny_encoder), str(no_corpus), "--out", str(tmp_path / "i")],
            "corpus.jsonl: no such file",
        ),
        (["evaluate", str(tiny_index), "--data", str(no_corpus)], "not a BEIR folder"),
        (["evaluate", str(tiny_index), "--data", str(tiny_beir), "--split", "dev"], "the splits of"),
        (["index", str(tiny_encoder), str(malformed), "--out", str(tmp_path / "i")], "not valid JSON"),
        (["finetune", "embed", "--model", str(tiny_encoder), "--data.train", str(missing_query)], "q999"),
    ):
        code, _, error = llmk(*args)
        assert code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "i").exists()


def test_read_beir_keeps_the_judged_queries(tiny_beir):
    test = read_beir(tiny_beir, "test")
    assert len(test.corpus) == 24 and sorted(test.queries) == sorted(test.qrels) and len(test.qrels) == 6
    assert test.corpus["d0"].startswith("paris ")  # title + text


@pytest.mark.e2e
def test_scifact_bm25_and_minilm_on_a_share_of_the_corpus(shared_data, tmp_path):
    """MiniLM and BM25 on SciFact's 300 test claims over the 283 judged abstracts and 500 others."""
    source = shared_data / "scifact_beir"
    if not (source / "corpus.jsonl").is_file():
        pytest.skip(f"{source} is absent")
    judged = {line.split("\t")[1] for line in (source / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    folder = tmp_path / "scifact"
    (folder / "qrels").mkdir(parents=True)
    shutil.copy(source / "queries.jsonl", folder)
    shutil.copy(source / "qrels" / "test.tsv", folder / "qrels")
    lines = (source / "corpus.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["_id"] in judged]
    kept += [line for line in lines if json.loads(line)["_id"] not in judged][:500]
    (folder / "corpus.jsonl").write_text("\n".join(kept) + "\n")
    result = run_llmk("evaluate", "all-minilm-l6-v2", "--data", str(folder), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["queries"] == 300 and report["documents"] == len(kept)
    # on the whole corpus: dense 0.645, bm25 0.679, hybrid 0.713 (README); fewer distractors score higher
    for mode in ("dense", "bm25", "hybrid"):
        assert report[mode]["ndcg_at_10"] > 0.64 and report[mode]["recall_at_100"] > 0.9
    assert (
        report["hybrid"]["ndcg_at_10"]
        > max(report["dense"]["ndcg_at_10"], report["bm25"]["ndcg_at_10"]) - 0.02
    )
