from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from llmkernel.models import attention
from llmkernel.models.attention import (
    CAUSAL_CPU,
    CAUSAL_SDPA,
    causal_attention,
    probabilities_per_head,
    use_causal_attention,
)
from llmkernel.models.presets import ModelConfig, build_model


@pytest.fixture(scope="module")
def kernel():
    """The built kernel; its tests skip, with the reason, where it does not build (no compiler, ARM)."""
    problem = attention.load_cpu_kernel()  # built once per machine (~30 s), then cached by torch
    if problem:
        pytest.skip(f"the CPU attention kernel did not build: {problem}")


def projections(batch, heads, kv_heads, seq, dim, seed=0):
    """q, k, v as attention sees them: (B, heads, T, D) views of (B, T, heads, D) projection outputs."""
    generator = torch.Generator().manual_seed(seed)

    def view(n):
        return torch.randn(batch, seq, n, dim, generator=generator).transpose(1, 2).requires_grad_()

    return view(heads), view(kv_heads), view(kv_heads)


@pytest.mark.parametrize("keep", [True, False], ids=["kept-probabilities", "recomputed"])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, seq, dim",
    [(2, 4, 4, 256, 64), (3, 6, 2, 100, 32), (2, 3, 3, 130, 40), (1, 2, 1, 1, 16)],
    ids=["blocks-of-64", "grouped-query", "odd-sizes", "one-token"],
)
def test_kernel_matches_sdpa_forward_and_backward(kernel, batch, heads, kv_heads, seq, dim, keep):
    q, k, v = projections(batch, heads, kv_heads, seq, dim)
    grad = torch.randn(batch, heads, seq, dim, generator=torch.Generator().manual_seed(1))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    out, lse, kept = causal_attention(q, k, v, dim**-0.5, keep)
    assert kept.shape == (batch * heads if keep else 0, probabilities_per_head(seq))  # as the fake op says
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # outputs come in the projections' layout, so o_proj and the q/k/v projections need no copies
    assert out.transpose(1, 2).is_contiguous() and grads[0].transpose(1, 2).is_contiguous()
    scores = (q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)) * dim**-0.5
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


def tiny_decoder(seed=0) -> LlamaForCausalLM:
    """The `tiny` decoder preset (2 layers, width 64, 4 heads sharing 2 key/value heads) on SDPA."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(size="tiny"), "decoder", vocab_size=96, context_length=80, special_ids={})
    assert model.config._attn_implementation == "sdpa"
    return model


class CountingKernel:
    """The built kernel, counting its calls (to show the compiled model really runs it)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, {"forward": 0, "backward": 0}

    def __getattr__(self, name):
        if name not in self.calls:
            return getattr(self.kernel, name)

        def call(*args):
            self.calls[name] += 1
            return getattr(self.kernel, name)(*args)

        return call


def test_compiled_decoder_trains_like_eager_sdpa_and_still_decodes(kernel, monkeypatch):
    counting = CountingKernel(attention._kernel)
    monkeypatch.setattr(attention, "_kernel", counting)
    tokens = torch.randint(0, 96, (3, 71), generator=torch.Generator().manual_seed(2))
    losses = {}
    for name in ("eager sdpa", "compiled kernel"):
        model = tiny_decoder()
        step = lambda ids, m=model: m(input_ids=ids, labels=ids).loss  # noqa: E731
        if name == "compiled kernel":
            assert "CPU causal kernel" in use_causal_attention(model, cpu_kernel=True)
            assert model.config._attn_implementation == CAUSAL_CPU
            step = torch.compile(step, fullgraph=True)  # no graph break around the kernel
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[name] = []
        for _ in range(3):
            loss = step(tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert counting.calls == {"forward": 3 * 2, "backward": 3 * 2}  # 3 steps x 2 layers
    assert losses["compiled kernel"] == pytest.approx(losses["eager sdpa"], rel=1e-4)
    # decoding with a KV cache (one query against the cached keys) goes to SDPA
    generated = model.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9) and counting.calls["forward"] == 3 * 2 + 2  # the prompt's pass only


def test_other_attention_implementations_are_left_alone():
    model = tiny_decoder()
    model.set_attn_implementation("eager")
    assert "not switched" in use_causal_attention(model, cpu_kernel=True)
    assert model.config._attn_implementation == "eager"


@pytest.fixture
def unbuilt(monkeypatch):
    """No kernel loaded yet, on an x86-64 machine with ninja, and a build that must not be reached.

    A test changes what it checks (the machine, ninja, the build); PATH is restored afterwards.
    """
    import torch.utils.cpp_extension

    def unexpected(*args, **kwargs):
        raise AssertionError("the kernel was built")

    monkeypatch.setattr(attention, "_kernel", None)
    monkeypatch.setattr(attention.platform, "machine", lambda: "x86_64")
    monkeypatch.setitem(sys.modules, "ninja", SimpleNamespace(BIN_DIR="/nonexistent/ninja/bin"))
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", unexpected)
    return monkeypatch


def switched_note() -> str:
    model = tiny_decoder()
    note = use_causal_attention(model, cpu_kernel=True)
    assert model.config._attn_implementation == CAUSAL_SDPA
    return note


def test_a_kernel_that_does_not_build_leaves_sdpa(unbuilt):
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'llmk_causal_attention'\nc++: not found")

    unbuilt.setattr(torch.utils.cpp_extension, "load", broken)
    assert switched_note() == (
        "SDPA, causal without a mask (the CPU attention kernel did not build: "
        "RuntimeError: Error building extension 'llmk_causal_attention')"
    )


def test_no_ninja_leaves_sdpa_and_names_the_extra(unbuilt):
    unbuilt.setitem(sys.modules, "ninja", None)  # `import ninja` raises ImportError
    assert switched_note() == (
        "SDPA, causal without a mask (the CPU attention kernel did not build: "
        "ninja is not installed (pip install 'llmkernel[kernel]'))"
    )


@pytest.mark.parametrize("machine", ["aarch64", "arm64", ""])
def test_other_cpus_leave_sdpa_without_building(unbuilt, machine):
    unbuilt.setattr(attention.platform, "machine", lambda: machine)
    assert switched_note() == (
        "SDPA, causal without a mask (the CPU attention kernel did not build: "
        f"it is for x86-64 CPUs, this one is {machine or 'unknown'})"
    )
