"""Model presets: Llama-style decoders and BERT-style encoders, built with Hugging Face model classes.

Every model we build is a stock `LlamaForCausalLM` or `BertForMaskedLM`, so the folders we write load with
`AutoModelForCausalLM` / `AutoModelForMaskedLM` and any HF tool (peft, vLLM, llama.cpp converters) reads them.
Decoders: RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention (Touvron et al. 2023).
Encoders: post-LayerNorm BERT with learned positions and GELU (Devlin et al. 2019).
Encoder-decoders (translation, `seq2seq`): a stock `MarianMTModel` (AutoModelForSeq2SeqLM).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option

# name -> (layers, width, heads, kv_heads). Widths are multiples of 64 so head_dim stays 64 where possible.
DECODER_SIZES = {"tiny": (2, 64, 4, 2), "small": (4, 256, 4, 2), "base": (12, 768, 12, 4)}
ENCODER_SIZES = {"tiny": (2, 64, 4, 4), "small": (4, 256, 4, 4), "base": (12, 768, 12, 12)}
KINDS = ("auto", "decoder", "encoder")
# Encoder-decoder (Marian-style: the Transformer of Vaswani et al. 2017 with sinusoidal positions and
# shared source/target embeddings, as the OPUS-MT translation models): name -> (layers per stack, width,
# heads, feed-forward size).
SEQ2SEQ_SIZES = {"tiny": (2, 64, 4, 256), "small": (3, 256, 4, 1024), "base": (6, 512, 8, 2048)}
# Models built from scratch by name with a tokenizer (`llmk finetune seq2seq --model seq2seq-small
# --tokenizer DIR`): name -> (kind, size).
PRESET_MODELS = {f"seq2seq-{size}": ("seq2seq", size) for size in SEQ2SEQ_SIZES} | {
    f"decoder-{size}": ("decoder", size) for size in DECODER_SIZES
}


@dataclass
class ModelConfig:
    """The model: a preset size with any field overridden, or an existing model to continue from."""

    kind: str = option(
        "auto", "decoder (Llama-style) or encoder (BERT-style); auto: decoder for clm, encoder for mlm"
    )
    size: str = option("small", "preset: tiny, small or base")
    layers: int = option(0, "transformer blocks (0: the preset's)")
    width: int = option(0, "hidden size (0: the preset's)")
    heads: int = option(0, "attention heads (0: the preset's)")
    kv_heads: int = option(0, "key/value heads for grouped-query attention, decoders only (0: the preset's)")
    intermediate: int = option(
        0, "MLP hidden size (0: 8/3 x width rounded to 64 for SwiGLU, 4 x width for BERT)"
    )
    context_length: int = option(0, "maximum sequence length the model supports (0: the training seq_len)")
    tie_embeddings: bool = option(True, "share the input embedding and output head weights (decoders)")
    dropout: float = option(0.0, "dropout in attention and MLP blocks")
    rope_theta: float = option(10000.0, "rotary embedding base (decoders)")
    init_from: str | None = option(
        None,
        "continue from this model: an HF folder, a .gguf file or smollm2-135m-instruct (size fields are ignored)",
    )

    def __post_init__(self) -> None:
        check(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        check(
            self.size in DECODER_SIZES,
            "size",
            f"must be one of {', '.join(DECODER_SIZES)}, got {self.size!r}",
        )
        for name in ("layers", "width", "heads", "kv_heads", "intermediate", "context_length"):
            check(getattr(self, name) >= 0, name, "must be >= 0 (0 means the preset's value)")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")

    def resolved(self, kind: str) -> tuple[int, int, int, int, int]:
        """(layers, width, heads, kv_heads, intermediate) after applying overrides to the preset."""
        layers, width, heads, kv_heads = (DECODER_SIZES if kind == "decoder" else ENCODER_SIZES)[self.size]
        layers, width, heads = self.layers or layers, self.width or width, self.heads or heads
        kv_heads = heads if kind == "encoder" else (self.kv_heads or min(kv_heads, heads))
        check(width % heads == 0, "width", f"{width} is not divisible by heads={heads}")
        check(heads % kv_heads == 0, "kv_heads", f"heads={heads} is not divisible by kv_heads={kv_heads}")
        default_intermediate = 64 * round(8 * width / 3 / 64) if kind == "decoder" else 4 * width
        return layers, width, heads, kv_heads, self.intermediate or max(64, default_intermediate)


def build_model(
    config: ModelConfig, kind: str, vocab_size: int, context_length: int, special_ids: dict[str, int]
):
    """A freshly initialised HF model for `kind` ('decoder' or 'encoder') from the preset and overrides."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    layers, width, heads, kv_heads, intermediate = config.resolved(kind)
    if kind == "decoder":
        hf_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=context_length,
            rope_theta=config.rope_theta,
            attention_dropout=config.dropout,
            tie_word_embeddings=config.tie_embeddings,
            bos_token_id=special_ids.get("bos"),
            eos_token_id=special_ids.get("eos"),
            pad_token_id=special_ids.get("pad"),
        )
        return LlamaForCausalLM(hf_config)
    hf_config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=context_length,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        pad_token_id=special_ids.get("pad", 0),
    )
    return BertForMaskedLM(hf_config)


def build_seq2seq(
    size: str, vocab_size: int, context_length: int, special_ids: dict[str, int], dropout: float = 0.1
):
    """A freshly initialised `MarianMTModel` of preset `size` (SEQ2SEQ_SIZES), one vocabulary for both sides.

    Generation starts the decoder with the bos token (our BPE's <|endoftext|>, which is also eos) and
    stops at eos; padding is its own token so that it never counts as a prediction.
    """
    from transformers import MarianConfig, MarianMTModel

    layers, width, heads, ffn = SEQ2SEQ_SIZES[size]
    eos = special_ids["eos"]
    hf_config = MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=width,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=context_length,
        dropout=dropout,
        attention_dropout=0.0,
        activation_function="swish",  # as OPUS-MT's Marian models
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=special_ids["pad"],
        eos_token_id=eos,
        bos_token_id=special_ids.get("bos", eos),
        decoder_start_token_id=special_ids.get("bos", eos),
        forced_eos_token_id=eos,
    )
    return MarianMTModel(hf_config)


def build_preset(name: str, vocab_size: int, context_length: int, special_ids: dict[str, int]):
    """A fresh model of the preset called `name` (a key of PRESET_MODELS)."""
    kind, size = PRESET_MODELS[name]
    if kind == "seq2seq":
        return build_seq2seq(size, vocab_size, context_length, special_ids)
    return build_model(ModelConfig(size=size), kind, vocab_size, context_length, special_ids)


def count_parameters(model) -> dict[str, int]:
    """Total, trainable, input-embedding and output-head parameter counts (a tied head counts once in total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    return {"total": total, "trainable": trainable, "input_embedding": embedding, "output_head": head_params}


def flops_per_token(model, context_length: int, head_fraction: float = 1.0) -> int:
    """Training FLOPs per token: 6 x (parameters - input embedding) + 12 x layers x width x context.

    The output head is counted as a matmul even when it shares its weight with the input embedding
    (Kaplan et al. 2020, with the attention term of Chowdhery et al. 2022, appendix B). `head_fraction`
    is the share of positions the head runs on (the masked 15% for our MLM objective, 1 for next-token).
    """
    counts = count_parameters(model)
    config = model.config
    head = counts["output_head"]
    tied = head if _is_tied(model) else 0
    body = counts["total"] - counts["input_embedding"] + tied - head
    return int(
        6 * (body + head * head_fraction)
        + 12 * config.num_hidden_layers * config.hidden_size * context_length
    )


def _is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
