"""The forward pass the engine runs: a lean Llama decoder over a slot-based KV cache, and an HF fallback.

One scheduler step is one `forward(step)`: the prompt chunks being prefilled and one token per decoding
sequence are flattened into N rows and go through each matrix product together, so the weights stream from
memory once per step however many sequences run (CPU decoding is memory-bound). Only attention differs:
a prefill chunk attends causally within its own sequence, decode rows attend in one batched call.

When every product is weight-only on our CPU kernel and a step has decode rows only, all the layers run
in one C++ call (`decode_layers` in models/weight_only_kernels.cpp: RMSNorm, RoPE, the cache write,
attention and SwiGLU as plain loops between the kernel's products), which takes SmolLM2's batch-1 int4
step from 9.6 ms (this Python forward on the same kernel: ~4.5 ms of it outside the products, rms_norm
1.4 ms, SDPA 1.1 ms) to 6.1 ms.

Layout of the KV cache: one tensor [layers, 2 (k, v), slots, kv_heads, capacity, head_dim]. Each running
sequence owns a slot (its own cache rows) until it finishes; `capacity` grows by doubling up to
max_model_len as sequences get longer, so short requests never pay for the full context.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmkernel.models.weight_only import WeightOnlyLinear, kernel
from llmkernel.serve.quantize import Projection, WeightOnly, make_linear, weight_only_projection


@dataclass
class PrefillChunk:
    """`length` prompt tokens of the sequence in `slot`, starting at position `start`."""

    slot: int
    start: int
    length: int


@dataclass
class Step:
    """The rows of one forward: prefill chunks first (in order), then one row per decoding sequence."""

    token_ids: list[int]
    chunks: list[PrefillChunk] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)  # position of each decode row's token
    sample_rows: list[int] = field(default_factory=list)  # rows whose next-token logits are wanted

    def positions(self) -> list[int]:
        out = [c.start + i for c in self.chunks for i in range(c.length)]
        return out + self.decode_positions

    def slots(self) -> list[int]:
        return [c.slot for c in self.chunks for _ in range(c.length)] + self.decode_slots


def supports_fast_path(config) -> bool:
    """Llama-family configs our own forward implements exactly (others use `HFDecoder`)."""
    return getattr(config, "model_type", None) == "llama" and getattr(config, "hidden_act", "silu") == "silu"


class KVCache:
    """Keys and values of every running sequence: [layers, 2, slots, kv_heads, capacity, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 128,
    ) -> None:
        self.max_len = max_len
        shape = (num_layers, 2, num_slots, num_kv_heads, min(capacity, max_len), head_dim)
        self.data = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot (doubling, so growth costs O(1) per token)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past max_model_len {self.max_len}")
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        grown = self.data.new_zeros(*self.data.shape[:4], min(capacity, self.max_len), self.data.shape[5])
        grown[:, :, :, :, : self.capacity] = self.data
        self.data = grown


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor  # [hidden]
    qkv: Projection  # fused q, k, v projections: [hidden] -> [(heads + 2 kv_heads) * head_dim]
    out: Projection  # [heads * head_dim] -> [hidden]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Projection  # fused gate and up projections: [hidden] -> [2 * intermediate]
    down: Projection  # [intermediate] -> [hidden]


class LlamaDecoder:
    """Llama forward (RMSNorm, RoPE, grouped-query attention, SwiGLU) built from an HF LlamaForCausalLM."""

    def __init__(self, model, *, num_slots: int, max_len: int, quantize: str = "none") -> None:
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        device = model.device
        params = {name: p.detach() for name, p in model.named_parameters()}
        modules = dict(model.named_modules())

        def fused(names: list[str]) -> Projection:
            # One [sum(out), in] matrix instead of several: one kernel call, one pass over x.
            parts = [modules[name.removesuffix(".weight")] for name in names]
            if any(isinstance(part, WeightOnlyLinear) for part in parts):  # a quantized folder: use as stored
                return weight_only_projection(parts, quantize)
            weights = [params[name] for name in names]
            biases = [params.get(name.replace(".weight", ".bias")) for name in names]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            return make_linear(torch.cat(weights) if len(weights) > 1 else weights[0], bias, quantize)

        self.layers: list[DecoderLayer] = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            self.layers.append(
                DecoderLayer(
                    input_norm=params[p + "input_layernorm.weight"],
                    qkv=fused(qkv),
                    out=fused([p + "self_attn.o_proj.weight"]),
                    post_norm=params[p + "post_attention_layernorm.weight"],
                    gate_up=fused([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                    down=fused([p + "mlp.down_proj.weight"]),
                )
            )
        self.embedding = params["model.embed_tokens.weight"]  # [vocab, hidden]
        self.final_norm = params["model.norm.weight"]
        # The vocab projection: tied embeddings get their own (transposed or quantized) copy; a weight-only
        # quantized head (never tied, see models/weight_only.py) is used as stored.
        head = model.get_output_embeddings()
        if isinstance(head, WeightOnlyLinear):
            self.lm_head = weight_only_projection([head], quantize)
        else:
            head_mode = "int8" if quantize == "int4" else quantize  # as models/weight_only.py: HEAD_BITS
            self.lm_head = make_linear(head.weight.detach(), None, head_mode)
        self.cos, self.sin = _rope_tables(model, max_len)  # [max_len, head_dim] each
        dtype = self.embedding.dtype
        self.cache = KVCache(
            config.num_hidden_layers, num_slots, self.num_kv_heads, self.head_dim, max_len, device, dtype
        )
        self.device = device
        self.fused_layers = self._fused_layers()

    def _fused_layers(self) -> tuple[list[torch.Tensor], list[int]] | None:
        """The arguments of the kernel's `decode_layers` (models/weight_only_kernels.cpp: every layer of a
        decode step in one C++ call) where every product of every layer runs on our weight-only kernel and
        the cache is fp32 on CPU; else None (this Python forward runs)."""
        if self.cache.data.dtype != torch.float32 or self.device.type != "cpu":
            return None
        tensors, settings, none = [], [], torch.empty(0)
        for layer in self.layers:
            products = (layer.qkv, layer.out, layer.gate_up, layer.down)
            if not all(isinstance(p, WeightOnly) and p.mm is not None for p in products):
                return None
            tensors += [layer.input_norm.float().contiguous(), layer.post_norm.float().contiguous()]
            for p in products:
                tensors += [p.packed, p.scales, none if p.bias is None else p.bias]
                settings += [p.bits, p.group_size or 0]
        self.cos, self.sin = self.cos.float().contiguous(), self.sin.float().contiguous()
        return tensors, settings

    def free(self, slot: int) -> None:
        """Nothing to clear: a slot's stale rows are never read (attention is masked by position)."""

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        """Run the step's N rows through the model; returns logits [len(step.sample_rows), vocab]."""
        positions_list = step.positions()
        self.cache.reserve(max(positions_list) + 1)
        if self.fused_layers is not None and not step.chunks:  # decode rows only: one C++ call
            x = F.embedding(torch.tensor(step.token_ids), self.embedding)  # [N, hidden]
            x = kernel().decode_layers(
                x,
                *self.fused_layers,
                self.cache.data,
                step.decode_slots,
                step.decode_positions,
                self.cos,
                self.sin,
                self.num_heads,
                self.num_kv_heads,
                self.eps,
            )
            return self._logits(x, step)
        plan = _AttentionPlan(step, self.device)  # masks and indices shared by every layer
        positions = torch.tensor(positions_list, device=self.device)  # [N]
        slots = torch.tensor(step.slots(), device=self.device)  # [N]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [N, 1, head_dim]
        n, heads, kv_heads, dim = len(step.token_ids), self.num_heads, self.num_kv_heads, self.head_dim

        x = F.embedding(torch.tensor(step.token_ids, device=self.device), self.embedding)  # [N, hidden]
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.input_norm, self.eps)
            # .float(): weight-only products return bf16 (a no-op for the others)
            qkv = layer.qkv(h).float().view(n, heads + 2 * kv_heads, dim)  # heads: q..., k..., v...
            qkv[:, : heads + kv_heads] = _rotate(qkv[:, : heads + kv_heads], cos, sin)  # q and k at once
            # Write this step's keys and values: cache [2, slots, kv_heads, cap, dim] at (:, slot, :, pos)
            # takes rows [N, 2, kv_heads, dim], which is exactly the k, v part of qkv.
            self.cache.data[index][:, slots, :, positions] = qkv[:, heads:].view(n, 2, kv_heads, dim)
            attended = self._attention(plan, qkv[:, :heads], self.cache.data[index])  # [N, heads * dim]
            x = x + layer.out(attended)
            h = F.rms_norm(x, (x.shape[-1],), layer.post_norm, self.eps)
            gate, up = layer.gate_up(h).float().chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return self._logits(x, step)

    def _logits(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        # Only the rows that pick a next token need the final norm and the (largest) vocab projection.
        if step.sample_rows != list(range(x.shape[0])):
            x = x[torch.tensor(step.sample_rows, device=self.device)]
        return self.lm_head(F.rms_norm(x, (x.shape[-1],), self.final_norm, self.eps)).float()

    def _attention(self, plan: _AttentionPlan, q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """q [N, heads, dim] against one layer's cache [2, slots, kv_heads, cap, dim] -> [N, heads * dim]."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        keys, values = cache[0], cache[1]
        parts, row = [], 0
        for chunk, mask in zip(plan.chunks, plan.chunk_masks):
            # A prompt chunk: causal attention over its own slot, up to the chunk's end.
            end = chunk.start + chunk.length
            qc = q[row : row + chunk.length].transpose(0, 1).unsqueeze(0)  # [1, heads, T, dim]
            kc, vc = keys[chunk.slot, :, :end].unsqueeze(0), values[chunk.slot, :, :end].unsqueeze(0)
            out = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )  # [1, heads, T, dim]
            parts.append(out[0].transpose(0, 1).reshape(chunk.length, heads * dim))
            row += chunk.length
        if plan.num_decode:
            # One query token per sequence, all sequences in one call over cache slots [0, S). Grouped-query
            # attention without repeating K/V: the `group` query heads sharing a KV head become `group`
            # query rows against it (query heads are ordered kv_head * group + g, as in HF).
            batch, group, num_slots = plan.num_decode, heads // kv_heads, plan.num_slots
            queries = q[row:].reshape(batch, kv_heads, group, dim)
            if plan.decode_slots is not None:  # slots are not 0..B-1: place queries at their slots
                queries = q.new_zeros(num_slots, kv_heads, group, dim).index_copy_(
                    0, plan.decode_slots, queries
                )
            out = F.scaled_dot_product_attention(
                queries,
                keys[:num_slots, :, : plan.length],
                values[:num_slots, :, : plan.length],
                attn_mask=plan.decode_mask,
            )  # [S, kv_heads, group, dim]
            if plan.decode_slots is not None:
                out = out[plan.decode_slots]
            parts.append(out.reshape(batch, heads * dim))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class _AttentionPlan:
    """What every layer's attention needs for one step, built once per step (masks, slot indices)."""

    def __init__(self, step: Step, device: torch.device) -> None:
        self.chunks = step.chunks
        self.chunk_masks: list[torch.Tensor | None] = []
        for chunk in step.chunks:
            if chunk.start == 0:  # the whole prefix is in the chunk: plain causal attention
                self.chunk_masks.append(None)
                continue
            end = chunk.start + chunk.length  # later chunk: query i sits at position start + i
            query_positions = torch.arange(chunk.start, end, device=device)
            self.chunk_masks.append(torch.arange(end, device=device)[None, :] <= query_positions[:, None])
        self.num_decode = len(step.decode_slots)
        if not self.num_decode:
            return
        self.num_slots = max(step.decode_slots) + 1
        self.length = max(step.decode_positions) + 1
        positions = torch.zeros(self.num_slots, dtype=torch.long, device=device)  # [S]
        self.decode_slots: torch.Tensor | None = None
        if step.decode_slots == list(range(self.num_decode)):
            positions[:] = torch.tensor(step.decode_positions, device=device)
        else:
            self.decode_slots = torch.tensor(step.decode_slots, device=device)
            positions[self.decode_slots] = torch.tensor(step.decode_positions, device=device)
        # Slots not decoding in this step get a dummy query that sees position 0 only (no all-masked rows).
        mask = torch.arange(self.length, device=device)[None, :] <= positions[:, None]  # [S, L]
        self.decode_mask = mask[:, None, None]  # [S, 1, 1, L], broadcast over kv_heads and group


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, HF's half-split convention: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rope_tables(model, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, head_dim] from the model's own rotary module (so rope scaling types match)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_len, device=model.device)[None]
    probe = torch.zeros(1, device=model.device, dtype=torch.float32)
    with torch.inference_mode():
        cos, sin = rotary(probe, positions)  # [1, max_len, head_dim]
    return cos[0].to(model.dtype), sin[0].to(model.dtype)


class HFDecoder:
    """Any other causal LM: the HF forward with one cache per sequence, one sequence at a time.

    Slower than `LlamaDecoder` (no batching across sequences) but serves every `AutoModelForCausalLM`.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.caches: dict[int, object] = {}  # slot -> the model's cache object
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away).
        self.cache_argument = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def free(self, slot: int) -> None:
        self.caches.pop(slot, None)

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        pieces = [(c.slot, c.start, c.length) for c in step.chunks]
        pieces += [(slot, pos, 1) for slot, pos in zip(step.decode_slots, step.decode_positions)]
        wanted, logits, row = set(step.sample_rows), {}, 0
        for slot, start, length in pieces:
            if start == 0:
                self.caches.pop(slot, None)
            ids = torch.tensor([step.token_ids[row : row + length]], device=self.model.device)
            cache = {self.cache_argument: self.caches.get(slot)}
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
            self.caches[slot] = out[self.cache_argument]
            if row + length - 1 in wanted:
                logits[row + length - 1] = out.logits[0, -1].float()
            row += length
        return torch.stack([logits[r] for r in step.sample_rows])
