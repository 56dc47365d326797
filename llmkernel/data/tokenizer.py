"""Step 5 of `llmk prepare`: train a tokenizer on the clean text, or reuse an existing model's.

Two kinds are trained with the Rust `tokenizers` library and saved as a Hugging Face tokenizer folder that
`transformers.AutoTokenizer.from_pretrained` loads:

* "bpe": byte-level BPE for decoders (GPT-2 style). Every one of the 256 bytes is in the vocabulary, so
  any text (Chinese, emoji, code) encodes without unknown tokens and decodes back exactly.
  "<|endoftext|>" (id 0) is bos, eos and the separator written between documents.
* "wordpiece": BERT-style for encoders, with [PAD] (id 0), [UNK], [CLS], [SEP] and [MASK].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmkernel.data.config import TokenizerConfig
from llmkernel.errors import InputError
from llmkernel.io.tokenizers import load_tokenizer

if TYPE_CHECKING:  # transformers imports torch (~2 s): only the functions that need it import it
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BPE_SPECIAL_TOKENS = [ENDOFTEXT, PAD, IM_START, IM_END]  # order fixes the ids: <|endoftext|> is 0
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] is 0

# What callers get when they do not truncate. Encoders have learned position embeddings of BERT's size;
# for decoders the pretraining stage knows the real context length and may save a smaller value.
MODEL_MAX_LENGTH = {"bpe": 8192, "wordpiece": 512}

# ChatML, matching the <|im_start|>/<|im_end|> special tokens, for instruction tuning later.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Texts longer than this many characters are fed to the trainer in pieces so memory stays bounded.
TRAIN_CHUNK_CHARS = 1_000_000


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a `config.kind` tokenizer on `texts` (streamed) and save it as an HF tokenizer folder in `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    if config.kind == "bpe":
        tokenizer, trainer = _bpe(config)
    else:
        tokenizer, trainer = _wordpiece(config)
    seen = [0]  # bytes fed to the trainer, counted by _training_chunks
    tokenizer.train_from_iterator(_training_chunks(texts, config.max_train_bytes, seen), trainer=trainer)
    if seen[0] == 0:
        raise InputError("no text to train the tokenizer on: check that the inputs are not all filtered out")

    if config.kind == "bpe":
        hf_tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token=ENDOFTEXT,
            eos_token=ENDOFTEXT,
            pad_token=PAD,
            additional_special_tokens=[IM_START, IM_END],
            model_max_length=MODEL_MAX_LENGTH["bpe"],
            clean_up_tokenization_spaces=False,  # keeps decode(encode(text)) == text
        )
        hf_tokenizer.chat_template = CHATML_TEMPLATE
    else:
        hf_tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            # token_type_ids mark the two segments of sentence-pair inputs, as in BERT
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
            model_max_length=MODEL_MAX_LENGTH["wordpiece"],
            clean_up_tokenization_spaces=False,
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(out_dir)
    return hf_tokenizer


def _bpe(config: TokenizerConfig) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tokenizer = Tokenizer(models.BPE())  # no unk token: the byte alphabet covers every input
    # No normalizer: the tokenizer must reproduce the text byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def _wordpiece(config: TokenizerConfig) -> tuple[Tokenizer, trainers.WordPieceTrainer]:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # handle_chinese_chars puts spaces around CJK ideographs, so each becomes its own word.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=WORDPIECE_SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        # Each kept character is a token of its own; CJK text has thousands, so cap them at half the vocabulary
        # (the rarest become [UNK]) to leave room for subwords and keep the vocabulary near vocab_size.
        limit_alphabet=(config.vocab_size - len(WORDPIECE_SPECIAL_TOKENS)) // 2,
        show_progress=False,
    )
    cls_id, sep_id = WORDPIECE_SPECIAL_TOKENS.index("[CLS]"), WORDPIECE_SPECIAL_TOKENS.index("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer, trainer


def _training_chunks(texts: Iterable[str], max_bytes: int, seen: list[int]) -> Iterator[str]:
    """`texts` cut at newlines into pieces of at most ~TRAIN_CHUNK_CHARS, stopping after `max_bytes` bytes.

    `seen[0]` counts the bytes yielded so far.
    """
    for text in texts:
        for chunk in _split_at_newlines(text, TRAIN_CHUNK_CHARS):
            yield chunk
            seen[0] += len(chunk.encode("utf-8"))
            if seen[0] >= max_bytes:
                return


def _split_at_newlines(text: str, size: int) -> Iterator[str]:
    start = 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size)
        end = cut + 1 if cut > start else start + size  # a single huge line is cut mid-line
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def reuse_tokenizer(model_dir: str | Path, out_dir: Path) -> PreTrainedTokenizerFast:
    """Copy the tokenizer of a model into `out_dir` (as tokenizer.json and config).

    `model_dir` is an HF model folder, a .gguf file or a known offline model name (see models.loading).
    """
    from llmkernel.models.loading import resolve_model

    folder = Path(model_dir)
    if not folder.is_dir() or (folder / "config.json").is_file():  # a name, a .gguf file or a model folder
        folder = resolve_model(
            model_dir
        )  # (an unfinished run says so); a bare tokenizer folder is used as is
    tokenizer = load_tokenizer(folder)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
