"""The `llmk prepare` config: one dataclass with a section per step (clean, filter, dedup, pii, tokenizer, pack).

This is the schema for `llmk prepare --help`, for YAML recipes and for the config saved in run.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option
from llmkernel.pii import PII_TYPES

FORMATS = ("auto", "txt", "jsonl", "json", "csv", "tsv", "parquet", "html")
TXT_SPLITS = ("file", "paragraph", "line")


@dataclass
class InputSpec:
    """One input (file, folder or glob) with options for reading it; recipes list these under `inputs`."""

    path: str = option(
        help="file, folder (read recursively) or glob; 'builtin:python-docs' is the demo corpus"
    )
    format: str = option(
        "auto", "one of " + ", ".join(FORMATS) + "; auto goes by extension (.gz/.zst allowed)"
    )
    text_field: str | None = option(
        None,
        "jsonl/json/parquet field or csv/tsv column with the text; default: the first of text, content, html",
    )
    html: bool | None = option(
        None, "the text is HTML to extract; default: yes for .html files and an 'html' field"
    )
    split: str = option("file", "for .txt: one document per file, per blank-line paragraph, or per line")
    source: str | None = option(None, "label stored as each document's source; default: the file path")

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "an input path is required")
        check(self.format in FORMATS, "format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        check(
            self.split in TXT_SPLITS, "split", f"must be one of {', '.join(TXT_SPLITS)}, got {self.split!r}"
        )


@dataclass
class CleanConfig:
    """Step 1: turn raw text or HTML into clean, normalised text."""

    enabled: bool = option(True, "run the clean step at all")
    html: bool = option(True, "extract the main text of HTML documents (drops navigation, scripts, styles)")
    fix_unicode: bool = option(True, "repair mojibake such as 'cafÃ©' -> 'café' (ftfy)")
    normalization: str = option("NFC", "Unicode normal form: NFC, NFKC or none")
    remove_control: bool = option(
        True, "drop control characters, the BOM and zero-width characters; CRLF -> LF"
    )
    collapse_whitespace: bool = option(True, "strip trailing spaces and collapse runs of 3+ blank lines")
    boilerplate: bool = option(True, "remove known boilerplate: Project Gutenberg header and license footer")
    remove_patterns: list[str] = option(help="regular expressions whose matches are removed", factory=list)

    def __post_init__(self) -> None:
        check(self.normalization in ("NFC", "NFKC", "none"), "normalization", "must be NFC, NFKC or none")
        import re

        for pattern in self.remove_patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                check(False, "remove_patterns", f"{pattern!r} is not a valid regular expression: {error}")


@dataclass
class FilterConfig:
    """Step 2: drop documents by length, character make-up, repetition (Gopher rules) and language."""

    enabled: bool = option(True, "run the filter step at all")
    min_chars: int = option(50, "drop documents shorter than this many characters")
    max_chars: int = option(0, "drop documents longer than this many characters (0: no limit)")
    min_words: int = option(0, "drop documents with fewer words (CJK characters count as words)")
    min_alpha_ratio: float = option(0.5, "minimum share of letters (any script) among non-space characters")
    max_symbol_ratio: float = option(0.1, "maximum ratio of '#' and '...' symbols to words (Gopher)")
    min_mean_word_length: float = option(2.0, "minimum mean word length, space-delimited scripts only")
    max_mean_word_length: float = option(12.0, "maximum mean word length, space-delimited scripts only")
    max_duplicate_line_fraction: float = option(0.3, "maximum share of lines that repeat an earlier line")
    max_duplicate_line_char_fraction: float = option(0.2, "maximum share of characters in repeated lines")
    max_top_ngram_fraction: float = option(
        0.2, "maximum share of characters covered by the most frequent 2-gram (3-gram, 4-gram: 0.18, 0.16)"
    )
    max_duplicate_ngram_fraction: float = option(
        0.15, "maximum share of characters in repeated 5-grams (6..10-grams step down to 0.10)"
    )
    languages: list[str] = option(
        help="keep only these ISO 639-1 languages, e.g. [en, zh]; empty: keep all", factory=list
    )
    min_language_score: float = option(0.5, "minimum language-ID probability for a language in `languages`")

    def __post_init__(self) -> None:
        check(self.min_chars >= 0, "min_chars", "must be >= 0")
        check(self.max_chars >= 0, "max_chars", "must be >= 0 (0 means no limit)")
        check(self.max_chars == 0 or self.max_chars >= self.min_chars, "max_chars", "must be >= min_chars")
        for name in (
            "min_alpha_ratio",
            "max_duplicate_line_fraction",
            "max_duplicate_line_char_fraction",
            "max_top_ngram_fraction",
            "max_duplicate_ngram_fraction",
            "min_language_score",
        ):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be between 0 and 1")
        check(self.max_symbol_ratio >= 0, "max_symbol_ratio", "must be >= 0")


@dataclass
class DedupConfig:
    """Step 3: drop exact duplicates (normalised hash) and near-duplicates (MinHash LSH) across the corpus."""

    exact: bool = option(True, "drop documents whose normalised text was seen before")
    near: bool = option(True, "drop near-duplicates found with MinHash LSH")
    threshold: float = option(
        0.8, "estimated Jaccard similarity of shingles above which documents are near-duplicates"
    )
    num_perm: int = option(128, "MinHash permutations (signature length)")
    shingle_size: int = option(5, "words per shingle (characters for CJK text)")
    seed: int = option(1, "seed of the MinHash permutations")

    def __post_init__(self) -> None:
        check(0.0 < self.threshold <= 1.0, "threshold", "must be in (0, 1]")
        check(16 <= self.num_perm <= 1024, "num_perm", "must be between 16 and 1024")
        check(self.shingle_size >= 1, "shingle_size", "must be >= 1")


@dataclass
class PiiConfig:
    """Step 4: find personal data and replace it with typed placeholders such as <EMAIL>."""

    enabled: bool = option(True, "mask personal data in the kept documents")
    types: list[str] = option(
        help="which types to mask: " + ", ".join(PII_TYPES), factory=lambda: list(PII_TYPES)
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        check(
            not unknown,
            "types",
            f"unknown PII type {unknown[0] if unknown else ''!r}; known: {', '.join(PII_TYPES)}",
        )


TOKENIZER_KINDS = ("bpe", "wordpiece")


@dataclass
class TokenizerConfig:
    """Step 5: train a byte-level BPE (decoders) or WordPiece (encoders) tokenizer, or reuse a model's."""

    kind: str = option("bpe", "bpe (byte-level, for decoders) or wordpiece (for encoders)")
    vocab_size: int = option(8192, "vocabulary size including special tokens")
    min_frequency: int = option(2, "minimum pair frequency for a merge")
    from_model: str | None = option(None, "reuse the tokenizer of this model folder instead of training one")
    max_train_bytes: int = option(
        100_000_000, "train on at most this many bytes of clean text (a seeded sample)"
    )

    def __post_init__(self) -> None:
        check(
            self.kind in TOKENIZER_KINDS,
            "kind",
            f"must be one of {', '.join(TOKENIZER_KINDS)}, got {self.kind!r}",
        )
        check(256 <= self.vocab_size <= 1_000_000, "vocab_size", "must be between 256 and 1,000,000")
        check(self.min_frequency >= 1, "min_frequency", "must be >= 1")
        check(self.max_train_bytes > 0, "max_train_bytes", "must be > 0")


@dataclass
class PackConfig:
    """Step 6: tokenize the clean text and write train/val token shards."""

    enabled: bool = option(True, "tokenize and write shards (false stops after the tokenizer)")
    val_fraction: float = option(0.05, "share of documents held out for validation (at least one when > 0)")
    val_selection: str = option(
        "random", "which documents: random (seeded sample) or last (the end of the corpus)"
    )
    shard_tokens: int = option(100_000_000, "tokens per shard file")

    def __post_init__(self) -> None:
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.val_selection in ("random", "last"), "val_selection", "must be random or last")
        check(self.shard_tokens >= 1024, "shard_tokens", "must be >= 1024")


EXECUTORS = ("local", "ray")


@dataclass
class PrepareConfig:
    """`llmk prepare`: raw files in; clean text, a tokenizer and train/val token shards out."""

    inputs: list[str | InputSpec] = option(
        help="input files, folders or globs", factory=list, positional=True
    )
    out: str = option("runs/data", "output folder (written atomically: it appears only when complete)")
    text_field: str | None = option(
        None, "text field or column for inputs given as plain paths (default: auto)"
    )
    split: str = option("file", "for .txt inputs given as plain paths: file, paragraph or line")
    clean: CleanConfig = option(factory=CleanConfig)
    filter: FilterConfig = option(factory=FilterConfig)
    dedup: DedupConfig = option(factory=DedupConfig)
    pii: PiiConfig = option(factory=PiiConfig)
    tokenizer: TokenizerConfig = option(factory=TokenizerConfig)
    pack: PackConfig = option(factory=PackConfig)
    workers: int = option(0, "worker processes for cleaning and tokenizing (0: one per CPU core)")
    executor: str = option("local", "local (process pool) or ray (Ray tasks; needs the 'ray' extra)")
    ray_address: str | None = option(
        None, "Ray cluster address for executor: ray (default: start a local one)"
    )
    batch_bytes: int = option(4_000_000, "raw bytes per work unit sent to a worker")
    strict: bool = option(False, "stop at the first malformed record instead of counting and skipping it")
    seed: int = option(0, "seed for the train/val split and the tokenizer training sample")
    force: bool = option(False, "run even when --out already holds a run with the same config and inputs")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        check(
            self.split in TXT_SPLITS, "split", f"must be one of {', '.join(TXT_SPLITS)}, got {self.split!r}"
        )
        self.inputs = [
            InputSpec(path=i, text_field=self.text_field, split=self.split) if isinstance(i, str) else i
            for i in self.inputs
        ]
        check(self.workers >= 0, "workers", "must be >= 0 (0 means one per CPU core)")
        check(
            self.executor in EXECUTORS,
            "executor",
            f"must be one of {', '.join(EXECUTORS)}, got {self.executor!r}",
        )
        check(self.batch_bytes >= 1024, "batch_bytes", "must be >= 1024")
