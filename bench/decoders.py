"""The decoder half of bench/compress.py: `llmk quantize --mode int8|int4` of SmolLM2-135M-Instruct beside
llama.cpp's Q8_0 / Q4_0 of the same fp32 weights (written by `llmk export --format gguf`).

* quality: perplexity on the held-out last 20,000 characters of Tiny Shakespeare, from compress.json
  (the relative increase over fp32 is `metric_drop`);
* speed: single-stream greedy decoding of the same chat prompt, `--decode_tokens` new tokens (both stop at
  eos), our serving engine (`GenerationEngine` on the quantized folder, batch 1) against
  `llama_cpp.Llama.generate`, each with one thread (the engine's default on 2 cores keeps one core for
  HTTP), the sides taking turns for `--rounds` rounds; the median of each side and of the per-round ratio.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from llmkernel.compress.config import QuantizeConfig
from llmkernel.compress.gguf import export_gguf
from llmkernel.compress.measure import folder_bytes
from llmkernel.compress.quantize import quantize
from llmkernel.config import build
from llmkernel.models.loading import cached_gguf_folder, load_tokenizer_for, smollm2_gguf

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
GGUF_TYPE = {"int8": "q8_0", "int4": "q4_0"}
THREADS = 1
PROMPT = [
    {"role": "user", "content": "Write a long, detailed story about a lighthouse keeper's strangest night."}
]


def held_out(work: Path) -> Path:
    path = work / "shakespeare-held-out.txt"
    if not path.is_file():
        path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[-20_000:], encoding="utf-8")
    return path


def run_decoder(args, work: Path, mode: str) -> dict:
    source = cached_gguf_folder(smollm2_gguf())
    out = work / f"smollm2-{mode}"
    settings = {
        "model": str(source),
        "out": str(out),
        "mode": mode,
        "group_size": args.decoder_group_size,
        "threads": 2,
        "measure": {"eval": str(held_out(work)), "decode_tokens": 16, "repeats": 1},
    }
    quantize(build(QuantizeConfig, settings))
    document = json.loads((out / "compress.json").read_text())
    gguf = work / f"smollm2-{GGUF_TYPE[mode]}.gguf"
    if not gguf.is_file():
        export_gguf(source, gguf, dtype=GGUF_TYPE[mode])
    speed = race(out, gguf, args.decode_tokens, args.rounds)
    return {
        "mode": mode,
        "group_size": args.decoder_group_size if mode == "int4" else None,
        "metric": "perplexity",
        "source_perplexity": document["source"]["metrics"]["perplexity"],
        "perplexity": document["result"]["metrics"]["perplexity"],
        "metric_drop": document["comparison"]["metric_drop"],
        "greedy_agreement": document["comparison"]["greedy_agreement"],
        "max_logit_error": document["comparison"]["max_logit_error"],
        "bytes_ratio": folder_bytes(out) / folder_bytes(source),
        "llama_cpp_bytes_ratio": gguf.stat().st_size / folder_bytes(source),
        "speedup": speed["tokens_per_s"] / speed["fp32_tokens_per_s"],
        **speed,
    }


def race(folder: Path, gguf: Path, new_tokens: int, rounds: int) -> dict:
    """Tokens/s of our engine on `folder` (and on fp32), and of llama.cpp on `gguf`, in alternating rounds."""
    import llama_cpp

    from llmkernel.serve.engine import GenerationEngine, SamplingParams

    tokenizer = load_tokenizer_for(folder)
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    prompt = list(
        prompt if isinstance(prompt, list) else prompt["input_ids"]
    )  # a BatchEncoding in transformers 5
    engines = {
        "ours": GenerationEngine(folder, max_batch_size=1, num_threads=THREADS),
        "fp32": GenerationEngine(
            cached_gguf_folder(smollm2_gguf()), max_batch_size=1, num_threads=THREADS, quantize="none"
        ),
    }
    for engine in engines.values():
        engine.start()
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=1024, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)

    def ours(name: str):
        def run() -> int:
            ids, _, _ = engines[name].generate(prompt, params)
            return len(ids)

        return run

    def theirs() -> int:
        llm.reset()
        count = 0
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            count += 1
            if token == llm.token_eos() or count == new_tokens:
                break
        return count

    sides = {"ours": ours("ours"), "fp32": ours("fp32"), "llama_cpp": theirs}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    try:
        for side in sides.values():
            side()  # warm-up
        for index in range(rounds):
            order = list(sides) if index % 2 == 0 else list(reversed(sides))
            for name in order:
                started = time.perf_counter()
                tokens = sides[name]()
                rates[name].append(tokens / (time.perf_counter() - started))
    finally:
        for engine in engines.values():
            engine.stop()
        llm.close()
    ratios = [a / b for a, b in zip(rates["ours"], rates["llama_cpp"])]
    return {
        "tokens_per_s": statistics.median(rates["ours"]),
        "tokens_per_s_range": [min(rates["ours"]), max(rates["ours"])],
        "fp32_tokens_per_s": statistics.median(rates["fp32"]),
        "llama_cpp_tokens_per_s": statistics.median(rates["llama_cpp"]),
        "llama_cpp_tokens_per_s_range": [min(rates["llama_cpp"]), max(rates["llama_cpp"])],
        "ratio_vs_llama_cpp": statistics.median(ratios),
        "ratio_vs_llama_cpp_range": [min(ratios), max(ratios)],
        "threads": THREADS,
        "new_tokens": new_tokens,
    }
