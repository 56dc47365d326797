"""Structured pruning: FFN neurons, attention heads and whole layers removed, leaving a stock HF config.

Pure functions on a loaded model (BERT-family encoders, Llama decoders), in the order a caller uses them:

1. `measure_importance` runs a few calibration batches through the model with forward hooks and records,
   per layer, how much each FFN neuron and each attention head contributes to the residual stream
   (activation x weight: the mean norm of the neuron's or head's term in the layer's output projection),
   how much leaving each layer out changes the model's output (by default; or ShortGPT's Block Influence,
   1 - cosine between the layer's input and output; Men et al. 2024, "ShortGPT: Layers in Large Language
   Models are More Redundant Than You Expect"; `layer_removal_scores` says why not by default), and each
   Linear layer's input norm per feature (for Wanda, `sparsity.py`).
2. `prune_heads` / `prune_ffn` keep the same number of the highest-scoring heads / neurons in every layer,
   so the result is an ordinary config with a smaller `intermediate_size` / head count.
3. `prune_layers` drops the layers that change the hidden state least (ShortGPT; Gromov et al. 2024,
   "The Unreasonable Ineffectiveness of the Deeper Layers", who find the same redundancy measured by the
   angular distance between hidden states).

Measure again after each structural step: scores are indexed by layer and by neuron, and a stale
`Importance` is refused. What is refused, and why:
- BERT heads: transformers 5 derives BERT's head size as `hidden_size / num_attention_heads` and no longer
  supports `pruned_heads`, so a BERT with fewer heads of the same size is not a stock config.
- Llama heads are removed a whole KV group at a time (the group's K/V head and its query heads), which keeps
  the GQA ratio, shrinks the KV cache in proportion, and needs no change to how heads map to groups.
  transformers 5 also requires `hidden_size % num_attention_heads == 0` even with an explicit `head_dim`,
  so only head counts dividing `hidden_size` are stock configs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

ARCHITECTURES = {
    "bert": "BERT-family encoders (BertModel, BertFor...)",
    "llama": "Llama decoders (LlamaForCausalLM)",
}
BERT_HEADS_REFUSED = (
    "attention heads of a BERT cannot be pruned to a stock config: transformers 5 derives the head size as "
    "hidden_size / num_attention_heads and has no pruned_heads support; prune FFN neurons or layers instead"
)


@dataclass
class Importance:
    """Scores measured once on calibration batches (`measure_importance`); higher means more important.

    ffn: per layer, [intermediate_size] mean norm of each neuron's contribution to the FFN output.
    heads: per layer, [num_attention_heads] for BERT, [num_key_value_heads] (one score per KV group, the sum
        of its query heads' contributions) for Llama.
    layers: [num_hidden_layers] low = droppable: by default how much leaving the layer out changes the last
        hidden state (`layer_removal_scores`), or ShortGPT's 1 - cosine(layer input, layer output).
    inputs: per nn.Linear name inside the blocks, [in_features] L2 norm of that input feature over all
        calibration tokens (Wanda's ||X_j||).
    tokens: how many (non-padding) tokens were measured.
    """

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]
    layers: torch.Tensor
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0


# ------------------------------------------------------------------- where the parts of each architecture are


def check_architecture(model: nn.Module) -> str:
    """The architecture name ("bert" or "llama") of a supported model; ValueError naming those otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = "; ".join(f"{name}: {what}" for name, what in ARCHITECTURES.items())
        raise ValueError(
            f"pruning does not support {type(model).__name__} (model_type {model_type!r}); supported: {supported}"
        )
    return model_type


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (BertLayer / LlamaDecoderLayer) of a supported model."""
    base = model.base_model  # the model itself for BertModel / LlamaModel
    return base.encoder.layer if check_architecture(model) == "bert" else base.layers


def _set_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    base = model.base_model
    if check_architecture(model) == "bert":
        base.encoder.layer = layers
    else:
        base.layers = layers


def _ffn_parts(layer: nn.Module, arch: str) -> tuple[list[tuple[nn.Module, str]], tuple[nn.Module, str]]:
    """(parent, name) of the FFN's input projections (rows = neurons) and its output projection (columns)."""
    if arch == "bert":
        return [(layer.intermediate, "dense")], (layer.output, "dense")
    return [(layer.mlp, "gate_proj"), (layer.mlp, "up_proj")], (layer.mlp, "down_proj")


def _attention_output(layer: nn.Module, arch: str) -> nn.Linear:
    """The Linear that maps the concatenated heads back to the residual stream."""
    return layer.attention.output.dense if arch == "bert" else layer.self_attn.o_proj


def _head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return explicit or config.hidden_size // config.num_attention_heads


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the transformer blocks, by its `named_modules` name (not embeddings or heads)."""
    blocks = {id(module) for layer in transformer_layers(model) for module in layer.modules()}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) in blocks
    }


# ------------------------------------------------------------------- measuring importance


class _Recorder:
    """Forward hooks that accumulate the sums behind `Importance`; `tokens` selects non-padding positions."""

    def __init__(self, model: nn.Module) -> None:
        self.arch = check_architecture(model)
        self.config = model.config
        self.layers = transformer_layers(model)
        self.tokens: torch.Tensor | None = None  # [batch * seq] bool, set per batch
        self.count = 0
        self.squares: dict[str, torch.Tensor] = {}
        self.ffn = [torch.zeros(0, dtype=torch.float64) for _ in self.layers]
        self.heads = [torch.zeros(0, dtype=torch.float64) for _ in self.layers]
        self.change = torch.zeros(len(self.layers), dtype=torch.float64)
        self.handles = []
        for name, linear in block_linears(model).items():
            self.handles.append(linear.register_forward_pre_hook(self._input_hook(name)))
        for index, layer in enumerate(self.layers):
            down = getattr(*_ffn_parts(layer, self.arch)[1])
            self.handles.append(down.register_forward_pre_hook(self._ffn_hook(index, down)))
            output = _attention_output(layer, self.arch)
            self.handles.append(output.register_forward_pre_hook(self._head_hook(index, output)))
            self.handles.append(layer.register_forward_pre_hook(self._layer_in_hook(index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._layer_out_hook(index)))
        self.layer_inputs: dict[int, torch.Tensor] = {}

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, features] -> [real tokens, features] in float64."""
        rows = x.detach().reshape(-1, x.shape[-1])
        if self.tokens is not None and self.tokens.numel() == rows.shape[0]:
            rows = rows[self.tokens]
        return rows.double()

    def _input_hook(self, name: str):
        def hook(module, args):
            squares = self._rows(args[0]).square().sum(0)
            self.squares[name] = self.squares[name] + squares if name in self.squares else squares

        return hook

    def _ffn_hook(self, index: int, down: nn.Linear):
        def hook(module, args):
            # neuron j adds a_j * W[:, j] to the output: its norm is |a_j| * ||W[:, j]||
            column_norms = down.weight.detach().double().norm(dim=0)  # [intermediate]
            scores = self._rows(args[0]).abs().sum(0) * column_norms
            self.ffn[index] = self.ffn[index] + scores if self.ffn[index].numel() else scores

        return hook

    def _head_hook(self, index: int, output: nn.Linear):
        def hook(module, args):
            head_dim = _head_dim(self.config)
            rows = self._rows(args[0]).unflatten(1, (-1, head_dim))  # [tokens, heads, head_dim]
            weight = output.weight.detach().double().unflatten(1, (-1, head_dim))  # [hidden, heads, head_dim]
            # head h adds W[:, h] @ a_h to the residual stream: the mean norm of that term is its score
            scores = torch.stack(
                [(rows[:, h] @ weight[:, h].T).norm(dim=1).sum() for h in range(rows.shape[1])]
            )
            if self.arch == "llama":  # query heads h*ratio .. (h+1)*ratio-1 share KV head h
                scores = scores.reshape(self.config.num_key_value_heads, -1).sum(1)
            self.heads[index] = self.heads[index] + scores if self.heads[index].numel() else scores

        return hook

    def _layer_in_hook(self, index: int):
        def hook(module, args, kwargs):
            self.layer_inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _layer_out_hook(self, index: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            before, after = self._rows(self.layer_inputs.pop(index)), self._rows(out)
            self.change[index] += (1 - torch.nn.functional.cosine_similarity(before, after, dim=1)).sum()

        return hook

    def result(self) -> Importance:
        for handle in self.handles:
            handle.remove()
        if not self.count:
            raise ValueError("measuring importance needs at least one calibration batch with a real token")
        return Importance(
            ffn=[(scores / self.count).float() for scores in self.ffn],
            heads=[(scores / self.count).float() for scores in self.heads],
            layers=(self.change / self.count).float(),
            inputs={name: squares.sqrt().float() for name, squares in self.squares.items()},
            tokens=self.count,
        )


@torch.no_grad()
def measure_importance(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], layer_criterion: str = "removal"
) -> Importance:
    """Run `model(**batch)` on each calibration batch (no grad, eval mode) and return the `Importance`.

    Padding positions (attention_mask == 0) are left out of every score. Batches may hold labels; the loss
    is computed and ignored. `layer_criterion`: "removal" scores each layer by how much leaving it out
    changes the model's last hidden state (one more pass per layer), "influence" by ShortGPT's Block
    Influence of the layer alone (see `layer_removal_scores` for why removal is the default).
    """
    if layer_criterion not in ("removal", "influence"):
        raise ValueError(f"layer criterion must be removal or influence, got {layer_criterion!r}")
    batches = list(batches)
    recorder = _Recorder(model)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            ids = batch.get("input_ids")
            recorder.tokens = mask.reshape(-1).bool() if mask is not None else None
            recorder.count += int(recorder.tokens.sum()) if mask is not None else int(ids.numel())
            model(**batch)
    finally:
        model.train(was_training)
    importance = recorder.result()
    if layer_criterion == "removal":
        importance.layers = layer_removal_scores(model, batches)
    return importance


@torch.no_grad()
def layer_removal_scores(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[num_layers]: how much leaving each layer out changes what the model outputs; low = droppable.

    With a head (classifier, NER, LM): the mean KL divergence from the whole model's output distribution
    to the one without the layer, per prediction (per text, or per real token). A bare encoder: the mean
    1 - cosine of the last hidden state per real token.

    Why not Block Influence alone: on the SST-2 MiniLM classifier (6 layers, dev accuracy 0.8727, no
    recovery) it ranks layer 0 lowest (0.137 0.144 0.146 0.225 0.221 0.579), yet without layer 0 the
    accuracy is 0.781 and without layer 4 it is 0.876 (layer 1: 0.847, 2 and 3: 0.837, 5: 0.636). This
    score ranks them 4, 3, 2, 1, 0, 5 (KL 0.020 0.038 0.054 0.099 0.319 0.591): a layer that changes its
    own input little can still be one the later layers depend on. It costs one more pass over the
    calibration batches per layer.
    """
    layers = transformer_layers(model)
    llama = check_architecture(model) == "llama"
    was_training = model.training
    model.eval()

    def outputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """([predictions, classes] log-probabilities, True), or ([tokens, hidden], False) for a bare encoder."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if llama:
            inputs["use_cache"] = False  # layer indices have a gap while one is left out
        out = model(**inputs)
        values = out.logits if hasattr(out, "logits") else out.last_hidden_state
        rows = values.reshape(-1, values.shape[-1])
        mask = inputs.get("attention_mask")
        if values.dim() == 3 and mask is not None:
            rows = rows[mask.reshape(-1).bool()]
        rows = rows.double()
        return (torch.log_softmax(rows, dim=-1), True) if hasattr(out, "logits") else (rows, False)

    try:
        reference = [outputs(batch)[0] for batch in batches]
        scores = torch.zeros(len(layers), dtype=torch.float64)
        for index in range(len(layers)):
            _set_layers(model, nn.ModuleList(layer for i, layer in enumerate(layers) if i != index))
            total = count = 0.0
            for batch, full in zip(batches, reference):
                without, has_head = outputs(batch)
                if has_head:  # KL(full || without), summed over classes, per prediction
                    total += float((full.exp() * (full - without)).sum())
                else:
                    total += float((1 - torch.nn.functional.cosine_similarity(full, without, dim=1)).sum())
                count += full.shape[0]
            scores[index] = total / max(count, 1.0)
    finally:
        _set_layers(model, layers)
        model.train(was_training)
    return scores.float()


# ------------------------------------------------------------------- structured pruning


def _kept_count(total: int, fraction: float, unit: str) -> int:
    """How many of `total` units remain after removing `fraction` of them; ValueError when none or no change."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the share of {unit} to remove must be in [0, 1), got {fraction}")
    removed = round(fraction * total)
    if removed >= total:
        raise ValueError(f"removing {fraction:.0%} of {total} {unit} leaves none; remove a smaller share")
    if fraction > 0 and removed == 0:
        raise ValueError(f"{fraction:.0%} of {total} {unit} rounds to none removed; remove a larger share")
    return total - removed


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output features (dim 0) or input features (dim 1) `index` of `linear`."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    bias = linear.bias is not None
    new = nn.Linear(in_features, out_features, bias=bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias:
            new.bias.copy_(linear.bias[index] if dim == 0 else linear.bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _replace(parent: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    setattr(parent, name, _select(getattr(parent, name), index, dim))


def _check_scores(scores: list[torch.Tensor], sizes: list[int], what: str) -> None:
    if len(scores) != len(sizes) or any(s.numel() != size for s, size in zip(scores, sizes, strict=False)):
        raise ValueError(
            f"the {what} importance was measured on a different model (layers or sizes changed since); "
            "call measure_importance again after each structural pruning step"
        )


@torch.no_grad()
def prune_ffn(model: nn.Module, fraction: float, importance: Importance) -> int:
    """Remove `fraction` of the FFN neurons in every layer, keeping each layer's highest-scoring ones.

    Every layer keeps the same number, so `config.intermediate_size` describes them all. Returns that size.
    Raises ValueError when the fraction is outside [0, 1), leaves no neuron, or the importance is stale.
    """
    arch = check_architecture(model)
    layers = transformer_layers(model)
    keep = _kept_count(model.config.intermediate_size, fraction, "FFN neurons")
    _check_scores(importance.ffn, [model.config.intermediate_size] * len(layers), "FFN")
    if keep == model.config.intermediate_size:
        return keep
    for layer, scores in zip(layers, importance.ffn, strict=True):
        index = _top(scores, keep)
        inputs, output = _ffn_parts(layer, arch)
        for parent, name in inputs:
            _replace(parent, name, index, dim=0)
        _replace(*output, index, dim=1)
        if arch == "llama":
            layer.mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    return keep


@torch.no_grad()
def prune_heads(model: nn.Module, fraction: float, importance: Importance) -> int:
    """Remove `fraction` of the attention heads in every layer (Llama: whole KV groups). Returns heads kept.

    A KV group is one K/V head and the `num_attention_heads / num_key_value_heads` query heads that read it;
    removing whole groups keeps the GQA ratio (and the model's attention code unchanged) and shrinks k_proj,
    v_proj and the KV cache with q_proj and o_proj. Each layer keeps its highest-scoring groups.

    Raises ValueError for BERT (see the module docstring), a fraction outside [0, 1), one that leaves no KV
    group, a head count that does not divide `hidden_size` (transformers 5 rejects such a config), or a
    stale importance.
    """
    if check_architecture(model) == "bert":
        raise ValueError(BERT_HEADS_REFUSED)
    config = model.config
    layers = transformer_layers(model)
    groups, head_dim = config.num_key_value_heads, _head_dim(config)
    per_group = config.num_attention_heads // groups
    if not 0 <= fraction < 1:
        raise ValueError(f"the share of attention heads to remove must be in [0, 1), got {fraction}")
    if round(fraction * groups) >= groups:
        raise ValueError(
            f"removing {fraction:.0%} of the heads leaves no KV group: heads go a whole KV group "
            f"({per_group} query heads) at a time and at least one of the {groups} groups must remain"
        )
    keep = _kept_count(groups, fraction, f"KV groups ({per_group} query heads each)")
    if config.hidden_size % (keep * per_group):
        valid = [
            f"{1 - k / groups:.2f}" for k in range(1, groups) if config.hidden_size % (k * per_group) == 0
        ]
        raise ValueError(
            f"keeping {keep * per_group} of {config.num_attention_heads} heads is not a stock config "
            f"(transformers requires hidden_size {config.hidden_size} to be a multiple of the head count); "
            f"shares that work: {', '.join(valid) or 'none'}"
        )
    _check_scores(importance.heads, [groups] * len(layers), "head")
    if keep == groups:
        return config.num_attention_heads
    for layer, scores in zip(layers, importance.heads, strict=True):
        kept_groups = _top(scores, keep)
        # rows of group g in k/v: g*d .. (g+1)*d; its query heads: g*per_group .. (g+1)*per_group
        kv_rows = (kept_groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        query_heads = (kept_groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
        query_rows = (query_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        attention = layer.self_attn
        _replace(attention, "q_proj", query_rows, dim=0)
        _replace(attention, "k_proj", kv_rows, dim=0)
        _replace(attention, "v_proj", kv_rows, dim=0)
        _replace(attention, "o_proj", query_rows, dim=1)
    config.head_dim = head_dim  # explicit, now that hidden_size / heads no longer gives it
    config.num_key_value_heads = keep
    config.num_attention_heads = keep * per_group
    return config.num_attention_heads


def _per_layer_settings(config) -> list[str]:
    """Config fields holding one entry per layer (layer_types and the like) that dropping layers must cut."""
    return [
        name
        for name, value in config.to_dict().items()
        if "layer" in name and isinstance(value, list) and len(value) == config.num_hidden_layers
    ]


def prune_layers(model: nn.Module, count: int, importance: Importance) -> list[int]:
    """Drop the `count` layers that change the hidden state least (lowest `importance.layers`).

    One shot, as ShortGPT (Men et al. 2024): layers ranked once (`measure_importance`). The survivors are renumbered
    (attention `layer_idx`, used by the KV cache), `config.num_hidden_layers` and per-layer config lists
    (`layer_types`, ...) follow. Returns the dropped layers' original indices, ascending.
    Raises ValueError when `count` is negative, would leave no layer, or the importance is stale.
    """
    check_architecture(model)
    layers = transformer_layers(model)
    total = len(layers)
    if not 0 <= count < total:
        raise ValueError(f"can drop 0 to {total - 1} of the model's {total} layers, got {count}")
    if importance.layers.numel() != total:
        raise ValueError(
            f"the layer importance covers {importance.layers.numel()} layers but the model has {total}; "
            "call measure_importance again after each structural pruning step"
        )
    dropped = sorted(importance.layers.argsort()[:count].tolist())
    kept = [index for index in range(total) if index not in dropped]
    config = model.config
    for name in _per_layer_settings(config):
        setattr(config, name, [getattr(config, name)[index] for index in kept])
    new_layers = nn.ModuleList(layers[index] for index in kept)
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    _set_layers(model, new_layers)
    config.num_hidden_layers = len(kept)
    return dropped
