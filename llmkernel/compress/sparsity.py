"""Unstructured pruning: the least important weights of the blocks' Linear layers set to zero.

Two criteria (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", Wanda):
- magnitude: score |W_ij| (Han et al. 2015);
- wanda: score |W_ij| * ||X_j||_2, the weight times the L2 norm of its input feature over calibration tokens
  (`Importance.inputs`), so weights that read large activations survive even when they are small.

Three scopes decide which weights compete: `row` (each output row of each Linear, Wanda's per-output
comparison group, its best choice for LLMs), `layer` (each Linear as a whole) and `global` (every block
Linear together: layers end with different sparsities). Embeddings, the LM / classifier heads and biases
are left alone. Dense CPU kernels do the same work on a zero as on any other number, so the model gets no
faster: this is a size / quality trade-off that needs a sparse runtime (or 2:4 hardware) to pay off.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkernel.compress.pruning import Importance, block_linears

SPARSITY_METHODS = ("wanda", "magnitude")
SPARSITY_SCOPES = ("row", "layer", "global")


def _scores(name: str, linear: nn.Linear, method: str, importance: Importance | None) -> torch.Tensor:
    """[out_features, in_features] score of each weight; low scores are zeroed first."""
    weight = linear.weight.detach().abs().float()
    if method == "magnitude":
        return weight
    norms = None if importance is None else importance.inputs.get(name)
    if norms is None:
        raise ValueError(
            f"wanda needs the input norms of {name}: pass importance=measure_importance(model, batches) "
            "measured on this model, or use method='magnitude'"
        )
    if norms.numel() != linear.in_features:
        raise ValueError(
            f"the input norms of {name} have {norms.numel()} features but the layer reads {linear.in_features}; "
            "measure importance again after structural pruning"
        )
    return weight * norms.to(weight.device).float()[None, :]


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A bool mask of exactly `count` lowest entries of the 1-D `scores` (ties broken by position)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return mask
    threshold = scores.kthvalue(count).values
    mask = scores < threshold
    ties = (scores == threshold).nonzero().flatten()[: count - int(mask.sum())]
    mask[ties] = True
    return mask


def _masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Per layer, the bool mask of weights to zero."""
    if scope == "row":
        masks = {}
        for name, score in scores.items():
            count = round(sparsity * score.shape[1])
            mask = torch.zeros_like(score, dtype=torch.bool)
            if count:
                mask.scatter_(1, score.topk(count, dim=1, largest=False).indices, True)
            masks[name] = mask
        return masks
    if scope == "layer":
        return {
            name: _lowest(score.flatten(), round(sparsity * score.numel())).reshape(score.shape)
            for name, score in scores.items()
        }
    flat = torch.cat([score.flatten() for score in scores.values()])
    pieces = _lowest(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores.values()])
    return {
        name: piece.reshape(score.shape) for (name, score), piece in zip(scores.items(), pieces, strict=True)
    }


@torch.no_grad()
def sparsify(
    model: nn.Module,
    sparsity: float,
    *,
    method: str = "wanda",
    scope: str = "layer",
    importance: Importance | None = None,
) -> dict:
    """Zero the `sparsity` share of the block Linear weights with the lowest score, in place.

    Args:
        sparsity: share of weights zeroed, in [0, 1); per row / per layer / over all of them (`scope`).
        method: "wanda" (needs `importance` from `measure_importance`) or "magnitude".
        scope: "row", "layer" or "global" (module docstring).
    Returns:
        {"sparsity": achieved share of zeros over the pruned weights, "target", "weights": how many were
        candidates, "zeros", "method", "scope", "layers": {Linear name: its share of zeros}}.
    Raises:
        ValueError for a sparsity outside [0, 1), an unknown method or scope, or wanda without (current)
        input norms.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if method not in SPARSITY_METHODS:
        raise ValueError(f"unknown sparsity method {method!r}; choose one of {', '.join(SPARSITY_METHODS)}")
    if scope not in SPARSITY_SCOPES:
        raise ValueError(f"unknown sparsity scope {scope!r}; choose one of {', '.join(SPARSITY_SCOPES)}")
    linears = block_linears(model)
    scores = {name: _scores(name, linear, method, importance) for name, linear in linears.items()}
    for name, mask in _masks(scores, sparsity, scope).items():
        linears[name].weight.masked_fill_(mask.to(linears[name].weight.device), 0)
    layers = {name: float((linear.weight == 0).float().mean()) for name, linear in linears.items()}
    weights = sum(linear.weight.numel() for linear in linears.values())
    zeros = sum(int((linear.weight == 0).sum()) for linear in linears.values())
    return {
        "sparsity": zeros / weights,
        "target": sparsity,
        "weights": weights,
        "zeros": zeros,
        "method": method,
        "scope": scope,
        "layers": layers,
    }


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per block Linear name, the bool mask of its zero weights (recovery holds them at zero)."""
    return {name: linear.weight.detach() == 0 for name, linear in block_linears(model).items()}
