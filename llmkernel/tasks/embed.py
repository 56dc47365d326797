"""`embed`: contrastive fine-tuning of a sentence encoder for retrieval, with in-batch negatives.

Each training example is a (query, relevant document) pair, from a BEIR folder's train qrels or a jsonl
pair file. A batch of B pairs embeds the B queries and the B documents (plus optional hard negatives);
every query scores every document of the batch, and the loss is the cross-entropy of picking its own
document: InfoNCE (van den Oord et al. 2018), sentence-transformers' MultipleNegativesRankingLoss, with
cosine similarities multiplied by a scale of 20 (a temperature of 0.05) as it does. `--data.symmetric`
adds the documents-to-queries direction. A document that is relevant to a query but belongs to another
pair of the batch is masked out of that query's candidates (it is no negative).

Embeddings are the mean of the last hidden states over the real tokens, L2-normalised: what
all-MiniLM-L6-v2 (sentence-transformers) uses and what `llmk serve` returns on /v1/embeddings.

`--data.hard_negatives N` mines N hard negatives per pair before training: the starting model ranks the
corpus for each training query and the best-ranked documents that are not relevant join the batch as extra
candidates for every query. Evaluation during training ranks the whole corpus for held-out queries
(nDCG@10, recall@100, MRR@10 with ranx); `llmk evaluate` adds BM25 and hybrid rankings (llmkernel.retrieval).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmkernel.errors import InputError
from llmkernel.io.beir import Pair, RetrievalSet, is_beir_folder, qrels_splits, read_beir, read_pairs
from llmkernel.tasks import report as reports
from llmkernel.tasks.base import SupervisedTask, pad
from llmkernel.tasks.metrics import ranking_metrics

QUERY_MAX_LENGTH = 64  # SciFact claims: median 12 words, 99.9% under 64 tokens
DOCUMENT_MAX_LENGTH = (
    256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json): what it was tuned at
)
EMBED_BATCH_SIZE = 64  # texts per forward pass when embedding a corpus
NEGATIVE_SEARCH_DEPTH = 30  # hard negatives come from the top 30 of the starting model's ranking
TOP_K = 100  # documents kept per query (recall@100 needs 100)
# Documents ranked at each evaluation during training: the held-out queries' relevant ones and a seeded
# sample of the rest. Embedding all of SciFact's 5,183 abstracts takes ~10 CPU-minutes on this machine's
# cores, more than an epoch of training; 800 keep model selection cheap (`llmk evaluate` ranks them all).
EVAL_DOCUMENTS = 800


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) L2-normalised mean of `hidden` (batch, length, hidden) over the unmasked tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, length, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled, p=2, dim=-1)


def sentence_max_length(folder: str | Path, fallback: int = DOCUMENT_MAX_LENGTH) -> int:
    """The encoder's own max_seq_length (sentence-transformers' sentence_bert_config.json), else `fallback`."""
    config = Path(folder) / "sentence_bert_config.json"
    try:
        return int(json.loads(config.read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    device: torch.device | str = "cpu",
    batch_size: int = EMBED_BATCH_SIZE,
    progress: bool = False,
    desc: str = "embedding",
) -> np.ndarray:
    """(len(texts), hidden) float32 unit vectors, in batches of similar length (longest first)."""
    model.eval()
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False)[
        "input_ids"
    ]
    return embed_ids(model, ids, tokenizer.pad_token_id or 0, device, batch_size, progress, desc)


@torch.no_grad()
def embed_ids(
    model: torch.nn.Module,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = EMBED_BATCH_SIZE,
    progress: bool = False,
    desc: str = "embedding",
) -> np.ndarray:
    """`embed_texts` for texts already tokenized."""
    model.eval()
    order = np.argsort([-len(row) for row in ids], kind="stable")
    vectors: np.ndarray | None = None
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chosen = order[start : start + batch_size]
        rows = [ids[i] for i in chosen]
        input_ids = pad(rows, pad_id).to(device)
        mask = pad([[1] * len(row) for row in rows], 0).to(device)
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = mean_pool(hidden.float(), mask).cpu().numpy()
        if vectors is None:
            vectors = np.zeros((len(ids), pooled.shape[1]), dtype=np.float32)
        vectors[chosen] = pooled
    return vectors if vectors is not None else np.zeros((0, 0), dtype=np.float32)


def top_k(queries: np.ndarray, documents: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search: (scores, indices), each (queries, k), of the k best documents by inner product."""
    scores = torch.from_numpy(queries) @ torch.from_numpy(documents).T  # (queries, documents)
    best = torch.topk(scores, min(k, documents.shape[0]), dim=1)
    return best.values.numpy(), best.indices.numpy()


def as_run(
    query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray, indices: np.ndarray
) -> dict[str, dict[str, float]]:
    """A ranx/TREC run: query id -> {document id: score} from `top_k`'s arrays."""
    return {
        q: {doc_ids[j]: float(s) for j, s in zip(row_indices, row_scores)}
        for q, row_scores, row_indices in zip(query_ids, scores, indices)
    }


def _split_queries(retrieval: RetrievalSet, fraction: float, seed: int) -> tuple[RetrievalSet, RetrievalSet]:
    """(train, held out) by query: a seeded `fraction` of the queries (at least one) is held out."""
    ids = sorted(retrieval.qrels)
    order = np.random.default_rng(seed).permutation(len(ids))
    held = {ids[i] for i in order[: max(1, int(len(ids) * fraction))]}

    def part(keep: bool) -> RetrievalSet:
        chosen = [q for q in ids if (q in held) != keep]
        return RetrievalSet(
            retrieval.corpus,
            {q: retrieval.queries[q] for q in chosen},
            {q: retrieval.qrels[q] for q in chosen},
            retrieval.folder,
            retrieval.split,
        )

    return part(True), part(False)


def _pairs_as_set(pairs: Sequence[Pair], first_query: int = 0) -> RetrievalSet:
    """Pairs as a retrieval set: the queries, and a corpus of every positive (and negative) text."""
    corpus: dict[str, str] = {}
    key_of: dict[str, str] = {}
    for pair in pairs:
        for text in [pair.positive, *pair.negatives]:
            if text not in key_of:
                key_of[text] = f"pair-document-{len(key_of)}"  # apart from a BEIR eval folder's ids
                corpus[key_of[text]] = text
    queries, qrels = {}, {}
    for index, pair in enumerate(pairs, first_query):
        queries[f"pair-query-{index}"] = pair.query
        qrels[f"pair-query-{index}"] = {key_of[pair.positive]: 1}
    return RetrievalSet(corpus, queries, qrels)


def _eval_split(folder: str) -> str:
    """The split of an evaluation BEIR folder: dev if it has one, else test."""
    splits = qrels_splits(folder)
    for split in ("dev", "validation", "test"):
        if split in splits:
            return split
    raise InputError(f"{folder}: no qrels/dev.tsv or qrels/test.tsv to evaluate on (it has: {splits})")


class ContrastiveEmbed(SupervisedTask):
    """Retrieval embeddings: InfoNCE over in-batch (and optionally mined hard) negatives."""

    name = "embed"
    model_kind = "encoder"
    peft_task_type = "FEATURE_EXTRACTION"
    default_metric = "ndcg_at_10"
    metrics = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
    headline = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
    lower_is_better = ("loss",)
    attackable = False
    uses_class_weights = False
    example_unit = "pairs"
    # Defaults: ~80 optimizer steps (3 epochs of SciFact's train pairs) at half finetune's learning rate
    # (5e-5 for MiniLM). The pretrained encoder is already a retriever, so a short, gentle run; a step of 32
    # pairs at 256 tokens takes 20-45 s on this project's 2 busy cores. The run it gives is in the README.
    target_steps = 80
    lr_scale = 0.5
    # Length-grouped batches (the base's default): batches of similar document lengths pad less, and the
    # in-batch negatives stay random across epochs.

    def __init__(
        self,
        tokenizer,
        max_length: int,
        batch_size: int,
        seed: int = 0,
        scale: float = 20.0,
        symmetric: bool = False,
        hard_negatives: int = 0,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, seed)
        self.scale, self.symmetric, self.hard_negatives = scale, symmetric, hard_negatives
        self.query_max_length = min(QUERY_MAX_LENGTH, max_length)
        self.retrieval: RetrievalSet | None = None  # the evaluation queries and the corpus they search
        self.train_set: RetrievalSet | None = None
        self.doc_ids: list[str] = []  # corpus order: the index of a document in doc_tokens
        self.doc_tokens: list[list[int]] = []
        self.mined = False

    # ------------------------------------------------------------------------------------ reading data

    @classmethod
    def accepts(cls, path: str | Path) -> bool:
        return is_beir_folder(path)

    @classmethod
    def from_training_files(
        cls, tokenizer, model_config, data: Any, seed: int, batch_size: int, max_length: int
    ):
        """The task with `data.train` (a BEIR folder: its train qrels; or a jsonl pair file) encoded, and
        `data.eval` (a BEIR folder: its dev, else test qrels) or a held-out share of the train queries."""
        if is_beir_folder(data.train):
            train = read_beir(data.train, "train")
            if data.limit:
                kept = sorted(train.qrels)[: data.limit]
                train.qrels = {q: train.qrels[q] for q in kept}
                train.queries = {q: train.queries[q] for q in kept}
            if data.eval:
                evaluation = read_beir(data.eval, _eval_split(data.eval))
            else:
                train, evaluation = _split_queries(train, data.eval_fraction, seed)
        else:
            if Path(data.train).is_dir():
                raise InputError(
                    f"{data.train}: a folder without corpus.jsonl; pass a BEIR folder or a jsonl file"
                )
            pairs = read_pairs(data.train)[: data.limit or None]
            if data.eval:
                train, evaluation = _pairs_as_set(pairs), read_beir(data.eval, _eval_split(data.eval))
            else:
                order = np.random.default_rng(seed).permutation(len(pairs))
                cut = max(1, int(len(pairs) * data.eval_fraction))
                held = [pairs[i] for i in order[:cut]]
                kept = [pairs[i] for i in order[cut:]]
                train = _pairs_as_set(kept + held)  # one corpus: every positive, the held-out ones too
                evaluation = _pairs_as_set(held, first_query=len(kept))
                evaluation.corpus = train.corpus
                train.queries = {q: train.queries[q] for q in list(train.queries)[: len(kept)]}
                train.qrels = {q: train.qrels[q] for q in train.queries}
        if not max_length:
            max_length = min(
                sentence_max_length(model_config.name_or_path), model_config.max_position_embeddings
            )
        task = cls(
            tokenizer,
            max_length,
            batch_size,
            seed,
            scale=data.scale,
            symmetric=data.symmetric,
            hard_negatives=data.hard_negatives,
        )
        task.set_corpus(
            train.corpus if evaluation.corpus is train.corpus else {**train.corpus, **evaluation.corpus}
        )
        task.train_set = train
        task.set_train(task.encode_pairs(train))
        task.set_evaluation(evaluation)
        task.sample_eval_documents(EVAL_DOCUMENTS, seed)
        return task

    @classmethod
    def for_evaluation(
        cls, path: str, model, tokenizer, max_length: int, batch_size: int, columns: dict, limit: int
    ):
        """The task with the BEIR folder `path` (its test split) as its evaluation set."""
        if not is_beir_folder(path):
            raise InputError(f"{path}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
        task = cls(tokenizer, min(max_length, sentence_max_length(model.config.name_or_path)), batch_size)
        retrieval = read_beir(path, columns.get("split") or "test")
        task.set_corpus(retrieval.corpus)
        task.set_evaluation(retrieval, limit)
        return task

    def set_corpus(self, corpus: dict[str, str]) -> None:
        self.doc_ids = list(corpus)
        self.doc_tokens = self._tokenize([corpus[d] for d in self.doc_ids], self.max_length)
        self.doc_index = {d: i for i, d in enumerate(self.doc_ids)}
        self.eval_documents = list(range(len(self.doc_ids)))  # what evaluation ranks (all, or a sample)

    def sample_eval_documents(self, count: int, seed: int) -> None:
        """Rank only the evaluation's relevant documents and a seeded sample of the rest, `count` in all."""
        relevant = {self.doc_index[d] for docs in self.retrieval.qrels.values() for d in docs}
        others = np.array(sorted(set(range(len(self.doc_ids))) - relevant))
        room = max(0, count - len(relevant))
        sample = np.random.default_rng(seed).permutation(others)[:room] if len(others) else others
        self.eval_documents = sorted(relevant | {int(i) for i in sample})

    def set_evaluation(self, retrieval: RetrievalSet, limit: int = 0) -> None:
        if limit:
            kept = list(retrieval.qrels)[:limit]
            retrieval.qrels = {q: retrieval.qrels[q] for q in kept}
            retrieval.queries = {q: retrieval.queries[q] for q in kept}
        self.retrieval = retrieval
        ids = self._tokenize(list(retrieval.queries.values()), self.query_max_length)
        self.eval = [{"input_ids": row} for row in ids]

    def _tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)[
            "input_ids"
        ]

    def encode_pairs(self, retrieval: RetrievalSet) -> list[dict[str, Any]]:
        """One example per (query, relevant document): token ids of both, and the keys that tell which
        other documents of a batch are also relevant to the query (masked out of its negatives)."""
        query_ids = list(retrieval.queries)
        query_tokens = self._tokenize([retrieval.queries[q] for q in query_ids], self.query_max_length)
        examples = []
        for query_index, query in enumerate(query_ids):
            for doc in retrieval.qrels[query]:
                document = self.doc_index[doc]
                examples.append(
                    {
                        "input_ids": self.doc_tokens[document],
                        "query_input_ids": query_tokens[query_index],
                        "query_key": query_index,
                        "document_key": document,
                        "negative_keys": [],
                    }
                )
        if not examples:
            raise InputError("no training pairs: the train qrels name no relevant documents")
        self.positives = {
            query_index: {self.doc_index[d] for d in retrieval.qrels[q]}
            for query_index, q in enumerate(query_ids)
        }
        return examples

    # -------------------------------------------------------------------------------- hard negatives

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Mines the hard negatives (once, with the starting model, before the first step) when asked;
        the training forward is the model itself."""
        if self.hard_negatives and not self.mined:
            self.mine_hard_negatives(model, next(model.parameters()).device)
        return model

    def mine_hard_negatives(self, model: torch.nn.Module, device: torch.device) -> None:
        """For each training pair, the `hard_negatives` best-ranked documents that are not relevant to its
        query, among the starting model's top NEGATIVE_SEARCH_DEPTH (documents embedded once)."""
        query_keys = sorted(self.positives)
        queries = {e["query_key"]: e["query_input_ids"] for e in self.train}
        documents = embed_ids(
            model, self.doc_tokens, self.pad_id, device, progress=self.progress, desc="mining"
        )
        vectors = embed_ids(model, [queries[k] for k in query_keys], self.pad_id, device)
        _, ranked = top_k(vectors, documents, NEGATIVE_SEARCH_DEPTH + self.hard_negatives)
        negatives = {
            key: [d for d in row if d not in self.positives[key]][: self.hard_negatives]
            for key, row in zip(query_keys, ranked.tolist())
        }
        for example in self.train:
            example["negative_keys"] = negatives[example["query_key"]]
        self.mined = True
        model.train()

    # ---------------------------------------------------------------------------------------- batches

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Documents (positives, then hard negatives) as input_ids; queries as query_input_ids."""
        negative_keys = [k for e in examples for k in e["negative_keys"]]
        documents = [e["input_ids"] for e in examples] + [self.doc_tokens[k] for k in negative_keys]
        queries = [e["query_input_ids"] for e in examples]
        document_keys = [e["document_key"] for e in examples] + negative_keys
        # relevant[i, j]: document j of the batch is relevant to query i (and is not its own positive)
        relevant = torch.zeros(len(examples), len(documents), dtype=torch.bool)
        for i, example in enumerate(examples):
            positives = self.positives.get(example["query_key"], set())
            for j, key in enumerate(document_keys):
                relevant[i, j] = j != i and key in positives
        return {
            "input_ids": pad(documents, self.pad_id),
            "attention_mask": pad([[1] * len(row) for row in documents], 0),
            "query_input_ids": pad(queries, self.pad_id),
            "query_attention_mask": pad([[1] * len(row) for row in queries], 0),
            "relevant": relevant,
        }

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["query_input_ids"].shape[0]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed InfoNCE of each query against the batch's documents (its own at the same index)."""
        queries = self._embed(model, batch["query_input_ids"], batch["query_attention_mask"])  # (B, hidden)
        documents = self._embed(model, batch["input_ids"], batch["attention_mask"])  # (B + negatives, hidden)
        scores = self.scale * queries @ documents.T  # (B, B + negatives) scaled cosine similarities
        scores = scores.masked_fill(batch["relevant"], float("-inf"))
        targets = torch.arange(queries.shape[0], device=scores.device)
        loss = F.cross_entropy(scores, targets, reduction="sum")
        if self.symmetric:  # documents to queries: each positive picks its own query among the batch's
            backward = scores[:, : queries.shape[0]].T
            loss = (loss + F.cross_entropy(backward, targets, reduction="sum")) / 2
        return loss

    @staticmethod
    def _embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden.float(), attention_mask)

    def steps_per_epoch(self, grad_accum: int, world_size: int) -> int:
        return math.ceil(self.batches.per_epoch / (grad_accum * world_size))

    @classmethod
    def head_modules(cls, model: torch.nn.Module) -> list[str]:
        return []  # no head: LoRA adapts the encoder itself

    def new_head(self) -> dict[str, Any] | None:
        return None

    # ------------------------------------------------------------------------------------- evaluation

    def rank(
        self, model: torch.nn.Module, device: torch.device, k: int = TOP_K
    ) -> dict[str, dict[str, float]]:
        """The dense run of the evaluation queries over the corpus: query id -> {document id: score}."""
        tokens = [self.doc_tokens[i] for i in self.eval_documents]
        documents = embed_ids(model, tokens, self.pad_id, device, progress=self.progress, desc="corpus")
        queries = embed_ids(model, [e["input_ids"] for e in self.eval], self.pad_id, device)
        scores, indices = top_k(queries, documents, k)
        ids = [self.doc_ids[i] for i in self.eval_documents]
        return as_run(list(self.retrieval.queries), ids, scores, indices)

    def report(self, model: torch.nn.Module, device: torch.device, examples=None) -> dict[str, Any]:
        """nDCG@10, recall@100 and MRR@10 of the dense ranking of the evaluation queries."""
        metrics = ranking_metrics(self.retrieval.qrels, self.rank(model, device))
        return {**metrics, "queries": len(self.eval), "documents": len(self.eval_documents)}

    def format_report(self, report: dict[str, Any]) -> str:
        return reports.format_headline(self.headline, report)
