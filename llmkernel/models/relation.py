"""Relation classification with entity markers: a stock encoder plus a head over the two entity-start states.

"Matching the Blanks" (Baldini Soares et al. 2019, the ENTITY MARKERS - ENTITY START variant): the two
entities are wrapped in marker tokens added to the tokenizer as special tokens (`<e1>`, `</e1>`, `<e2>`,
`</e2>`, the embedding matrix resized), and the relation is read from the final hidden states at the two
START markers, concatenated: `[h(<e1>); h(<e2>)]` (batch, 2 x hidden), then layer norm, dropout and a linear
layer over the labels. Not a [CLS] classifier: the [CLS] state sees the whole sentence, the marker states
are where the encoder looks at each entity in context.

The model is a plain `PreTrainedModel` wrapping whatever encoder `AutoModel` builds from the sub-config
(BERT, MiniLM, RoBERTa, ...), with its own config class (model_type `relation_classifier`) registered with
transformers' AutoConfig and AutoModel, so `save_pretrained`/`from_pretrained` round-trip and
`AutoModel.from_pretrained(folder)` gives it back. Its architecture name ends in `ForRelationClassification`,
which `models.loading.model_kind` reads as the `relation_classifier` kind.

A fresh model starts from an encoder folder (`from_pretrained` on a folder that is not a relation model):
the encoder's weights are loaded, its embeddings resized to the tokenizer with the markers, and the head is
new. The marker ids live in the config (`entity_start_ids`), so a saved folder needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "relation_classifier"
ENTITY_MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")  # SemEval-2010 Task 8's inline markers, kept as tokens


class RelationClassifierConfig(PreTrainedConfig):
    """The encoder's own config (`encoder`, any AutoConfig) plus what the relation head needs."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder: PreTrainedConfig | dict | None = None
    entity_markers: list[str] | None = None  # the marker tokens, in the order <e1> </e1> <e2> </e2>
    entity_start_ids: list[int] | None = None  # token ids of <e1> and <e2>: where the head reads
    classifier_dropout: float = 0.1
    pad_token_id: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def max_position_embeddings(self) -> int | None:
        return getattr(self.encoder, "max_position_embeddings", None)


class EncoderForRelationClassification(PreTrainedModel):
    """An encoder and a linear head over [h(<e1>); h(<e2>)], the hidden states at the two start markers."""

    config_class = RelationClassifierConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: RelationClassifierConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = AutoModel.from_config(config.encoder)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # the [CLS] pooler is not used (and would get no gradient)
        width = config.encoder.hidden_size
        self.norm = nn.LayerNorm(2 * width, eps=getattr(config.encoder, "layer_norm_eps", 1e-12))
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(2 * width, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear: normal(0, the encoder's initializer_range), LayerNorm: 1, 0

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def entity_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, 2): the index of the first <e1> and the first <e2> token in each row.

        Raises ValueError for a row without one of them (cut off by truncation, or never marked)."""
        positions = []
        for marker_id, name in zip(self.config.entity_start_ids, ("<e1>", "<e2>")):
            found = input_ids == marker_id  # (batch, seq)
            if not bool(found.any(-1).all()):
                row = int((~found.any(-1)).nonzero()[0])
                raise ValueError(f"row {row} of the batch has no {name} marker token; mark both entities")
            positions.append(found.int().argmax(-1))  # first True
        return torch.stack(positions, -1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        entity_positions: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Logits (batch, labels) from the states at the entity-start markers.

        `entity_positions` (batch, 2) are the token indices of <e1> and <e2>; found in `input_ids` when not
        given (they must be given with `inputs_embeds`). With `labels`, the mean cross-entropy as `loss`.
        """
        if entity_positions is None:
            if input_ids is None:
                raise ValueError(
                    "entity_positions is required with inputs_embeds (no token ids to find markers)"
                )
            entity_positions = self.entity_positions(input_ids)
        inputs = {"attention_mask": attention_mask, "input_ids": input_ids, "inputs_embeds": inputs_embeds}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs, **kwargs).last_hidden_state  # (batch, seq, hidden)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        starts = hidden[rows[:, None], entity_positions.to(hidden.device)]  # (batch, 2, hidden)
        relation = starts.reshape(hidden.size(0), -1)  # (batch, 2 x hidden): [h(<e1>); h(<e2>)]
        logits = self.classifier(self.dropout(self.norm(relation)))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, *args: Any, **kwargs: Any):
        """A saved relation model as it is; any other folder (an encoder) gets a fresh relation head.

        For an encoder folder, kwargs carry the head settings (`num_labels`, `id2label`, `label2id`,
        `pad_token_id`), `vocab_size` (the tokenizer's length, markers included) and `entity_start_ids`.
        """
        config_file = Path(folder) / "config.json"
        saved = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if saved.get("model_type") == MODEL_TYPE or not config_file.is_file():
            settings = {k: v for k, v in kwargs.items() if k not in ("vocab_size", "entity_start_ids")}
            return super().from_pretrained(folder, *args, **settings)
        return cls.from_encoder(folder, **kwargs)

    @classmethod
    def from_encoder(
        cls,
        folder: str | Path,
        *,
        config: RelationClassifierConfig | None = None,
        entity_start_ids: list[int] | None = None,
        vocab_size: int | None = None,
        entity_markers: list[str] | tuple[str, ...] = ENTITY_MARKERS,
        dtype: torch.dtype | None = None,
        output_loading_info: bool = False,
        ignore_mismatched_sizes: bool = False,
        **head: Any,
    ):
        """A new relation model on the encoder in `folder`: its weights, the embeddings resized to
        `vocab_size` (the new marker rows set by `init_marker_embeddings`), and a new head. With `config`
        (a LoRA adapter's base), the model is built from it instead of from the settings."""
        del ignore_mismatched_sizes  # the head is new in any case
        encoder = AutoModel.from_pretrained(folder, dtype=dtype or torch.float32)
        if config is None:
            config = RelationClassifierConfig(
                encoder={**encoder.config.to_dict(), "vocab_size": vocab_size},
                entity_markers=list(entity_markers),
                entity_start_ids=list(entity_start_ids),
                **head,
            )
        old_rows = encoder.get_input_embeddings().num_embeddings
        if old_rows != config.encoder.vocab_size:
            encoder.resize_token_embeddings(config.encoder.vocab_size, mean_resizing=False)
            init_marker_embeddings(encoder.get_input_embeddings().weight, old_rows)
        config.name_or_path = str(folder)  # where the encoder came from (a LoRA adapter's base model)
        model = cls(config).to(dtype or torch.float32)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
        result = model.encoder.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(f"{folder}: the encoder lacks {len(result.missing_keys)} weights")
        model.config.architectures = [cls.__name__]
        model.eval()
        if output_loading_info:
            head_keys = [k for k in model.state_dict() if not k.startswith(f"{cls.base_model_prefix}.")]
            return model, {
                "missing_keys": head_keys,
                "unexpected_keys": [],
                "mismatched_keys": [],
                "error_msgs": [],
            }
        return model


@torch.no_grad()
def init_marker_embeddings(weight: torch.Tensor, old_rows: int, seed: int = 0) -> None:
    """Rows `old_rows:` of the embedding matrix (the markers) drawn around the old rows' mean with their
    per-dimension spread, from a fixed seed: distinct markers, on the scale of real tokens, and the same
    every time (a LoRA adapter's base model, which keeps the embeddings frozen, is rebuilt identically)."""
    old = weight[:old_rows].float()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(weight.shape[0] - old_rows, weight.shape[1], generator=generator)
    weight[old_rows:] = (old.mean(0) + noise * old.std(0)).to(weight.dtype)


AutoConfig.register(MODEL_TYPE, RelationClassifierConfig, exist_ok=True)
AutoModel.register(RelationClassifierConfig, EncoderForRelationClassification, exist_ok=True)
