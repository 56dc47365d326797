"""Tiny random model folders shared by the serve, finetune and evaluate tests.

Real HF folders (config.json, safetensors, tokenizer files) small enough to build in well under a second:
a 2-layer Llama with a byte-level BPE tokenizer and a chat template, and 2-layer BERTs (plain, sequence
classification, token classification) with a small WordPiece vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, LlamaConfig, PreTrainedTokenizerFast

from llmkernel.data.config import TokenizerConfig
from llmkernel.data.tokenizer import train_tokenizer

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Alice lives in Paris and Bob works in Berlin.",
    "Call me at +44 20 7946 0958 or mail alice@example.com today.",
] * 20
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def tiny_llama(vocab_size: int, width: int = 32, layers: int = 2, **overrides):
    """A seeded random LlamaForCausalLM: `layers` blocks of `width`, 4 heads over 2 KV heads, SwiGLU 2x."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **overrides,
    }
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def make_tiny_llama(
    folder: Path, width: int = 32, tokenizer_corpus: list[str] = CORPUS, vocab_size: int = 320
) -> Path:
    """A 2-layer LlamaForCausalLM folder (width 32) with a byte-level BPE tokenizer of `vocab_size` tokens."""
    # the product's own byte-level BPE trainer: ChatML template, <|endoftext|> as eos
    config = TokenizerConfig(kind="bpe", vocab_size=vocab_size, min_frequency=1)
    tokenizer = train_tokenizer(tokenizer_corpus, config, folder)
    model = tiny_llama(
        len(tokenizer),
        width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)  # next to the tokenizer train_tokenizer saved
    return folder


def make_tiny_bert(folder: Path, head: str) -> Path:
    """A 2-layer BERT (width 32): head is "model" (BertModel), "classify" (2 labels) or "ner" (BIO tags)."""
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["hello", "world", "alice", "bob", "lives", "works", "in", "paris", "berlin", "the", "call", "me"]
    vocab_list = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *words,
        *letters,
        *[f"##{c}" for c in letters],
    ]
    vocab_list += list(".,@+-!?")
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab_list)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    labels = {"model": ["LABEL_0"], "classify": ["negative", "positive"], "ner": NER_LABELS}[head]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab_list),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model_class = {
        "model": BertModel,
        "classify": BertForSequenceClassification,
        "ner": BertForTokenClassification,
    }
    model_class[head](config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


RELATION_LABELS = ["Lives-In(e1,e2)", "Lives-In(e2,e1)", "Other"]


def make_tiny_relation(folder: Path) -> Path:
    """A relation model folder (`llmk finetune relation`'s layout) on a random 2-layer BERT: the entity
    markers added to the tokenizer, a random head over `RELATION_LABELS`."""
    from transformers import AutoTokenizer

    from llmkernel.models.loading import load_model
    from llmkernel.tasks.relation import RelationClassify, add_markers

    bert = make_tiny_bert(folder / "bert", "model")
    tokenizer = AutoTokenizer.from_pretrained(bert)
    add_markers(tokenizer)
    task = RelationClassify(tokenizer, RELATION_LABELS, max_length=64, batch_size=4)
    torch.manual_seed(0)
    model = load_model(bert, task.model_kind, new_head=task.new_head())
    model.save_pretrained(folder / "relation")
    tokenizer.save_pretrained(folder / "relation")
    return folder / "relation"
