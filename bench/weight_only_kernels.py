"""Weight-only int8/int4 on SmolLM2-135M: the kernels alone, then whole decode steps of the serving decoder.

    .venv/bin/python bench/weight_only_kernels.py [--threads 1] [--batches 1,4,16] [--rounds 4] [--no-kernels]

`kernels`: every matrix product of one decode step (30 layers of qkv, o, gate/up, down plus the vocab
projection, distinct weights per layer so nothing stays in cache), per kernel and batch. `decoder`: one
`LlamaDecoder.forward` of `batch` decode rows (sequences at position ~40) for fp32, fp16 and models
quantized with `quantize_weight_only`. Modes alternate within each round; prints one JSON line with the
median and the spread (min, max) in ms per step and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # (out, in)


def kernel_step(kind: str):
    """A function running one decode step's products with `kind`, and the bytes of weight it reads."""
    from llmkernel.models.weight_only import quantize_int4, quantize_int8, weight_only_mm

    products, nbytes = [], 0
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) * 0.02
        if kind.startswith("int4"):
            group = int(kind.split("g")[1])
            packed, scales = quantize_int4(weight, group)
            nbytes += packed.numel() + 2 * scales.numel()

            def product(x, p=packed, s=scales, g=group):
                return weight_only_mm(x, p, s, 4, g, None)
        elif kind == "int8":
            q, scale = quantize_int8(weight)
            nbytes += q.numel() + 2 * scale.numel()
            scale = scale.float()  # as the serving wrapper hands it to the kernel

            def product(x, q=q, s=scale):
                return weight_only_mm(x, q, s, 8, None, None)
        else:  # fp16 fbgemm
            packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
            nbytes += 2 * weight.numel()

            def product(x, p=packed):
                return torch.ops.quantized.linear_dynamic_fp16(x, p)

        products.append((product, in_features))

    def step(inputs: dict[int, torch.Tensor]) -> None:
        for product, in_features in products:
            product(inputs[in_features])

    return step, nbytes


def summary(times: list[float], rows: int) -> dict:
    median = statistics.median(times)
    return {
        "ms": round(median * 1e3, 2),
        "min_ms": round(min(times) * 1e3, 2),
        "max_ms": round(max(times) * 1e3, 2),
        "tok_s": round(rows / median, 1),
    }


def bench_kernels(batches: list[int], rounds: int) -> dict:
    kinds = ["int4g32", "int4g64", "int8", "fp16"]
    steps = {kind: kernel_step(kind) for kind in kinds}
    times = {(kind, b): [] for kind in kinds for b in batches}
    for _ in range(rounds):
        for b in batches:
            inputs = {576: torch.randn(b, 576), 1536: torch.randn(b, 1536)}
            for kind in kinds:
                steps[kind][0](inputs)  # warm-up call of this round: kernels chosen, buffers allocated
                start = time.perf_counter()
                steps[kind][0](inputs)
                times[(kind, b)].append(time.perf_counter() - start)
    result = {}
    for (kind, b), ts in times.items():
        entry = summary(ts, b)
        entry["GB_s"] = round(steps[kind][1] / statistics.median(ts) / 1e9, 1)
        result[f"{kind}/b{b}"] = entry
    return result


def bench_decoder(batches: list[int], rounds: int, steps_per_round: int = 8) -> dict:
    from llmkernel.models.loading import cached_gguf_folder, load_model, smollm2_gguf
    from llmkernel.models.weight_only import quantize_weight_only
    from llmkernel.serve.decoder import LlamaDecoder, PrefillChunk, Step

    folder = cached_gguf_folder(smollm2_gguf())
    slots, max_len = max(batches), 256
    decoders = {}
    for mode, engine_mode in (("fp32", "none"), ("fp16", "fp16")):
        decoders[mode] = LlamaDecoder(
            load_model(folder, "decoder"), num_slots=slots, max_len=max_len, quantize=engine_mode
        )
    for mode, bits, group in (("int8", 8, None), ("int4g32", 4, 32), ("int4g64", 4, 64)):
        model = load_model(folder, "decoder")
        quantize_weight_only(model, bits=bits, group_size=group)
        decoders[mode] = LlamaDecoder(model, num_slots=slots, max_len=max_len, quantize="none")
    prompt = list(range(100, 132))
    for decoder in decoders.values():
        for slot in range(slots):
            decoder.forward(Step(prompt, chunks=[PrefillChunk(slot, 0, len(prompt))], sample_rows=[31]))
    times = {(mode, b): [] for mode in decoders for b in batches}
    for _ in range(rounds):
        for b in batches:
            for mode, decoder in decoders.items():
                for i in range(steps_per_round):
                    position = len(prompt) + i
                    step = Step([7] * b, decode_slots=list(range(b)), decode_positions=[position] * b)
                    step.sample_rows = list(range(b))
                    start = time.perf_counter()
                    decoder.forward(step)
                    times[(mode, b)].append(time.perf_counter() - start)
    return {f"{mode}/b{b}": summary(ts, b) for (mode, b), ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-kernels", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    result = {"bench": "weight_only_kernels", "threads": args.threads, "torch": torch.__version__}
    if not args.no_kernels:
        result["kernels"] = bench_kernels(batches, args.rounds)
    result["decoder"] = bench_decoder(batches, args.rounds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
