"""The generations section: what the models write.

Three sources, each labelled on the page: the samples a pretraining logged at its evaluations (TensorBoard
text in tb/, the only place the loop stores them), the sample replies in an eval.json (chat models), and
short continuations the report generates itself from every decoder folder among the runs, greedy and
sampled with a fixed seed, from the first tokens of the run's validation documents (or fixed prompts
when the run has no data folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkernel.errors import InputError
from llmkernel.report.collect import Run, model_architecture
from llmkernel.report.document import Heading, Section, Table, Text

PROMPT_TOKENS = 16  # what the training loop's own sample starts from (tasks/clm.py)
TEMPERATURE, TOP_K = 0.8, 50  # the loop's sampling settings, so both kinds of sample read alike
FIXED_PROMPTS = ("The meaning of life is", "Once upon a time,", "def main():", "In this document we")
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")


def logged_samples(run: Run) -> list[tuple[int, str]]:
    """(step, text) of the samples a training run logged to TensorBoard; [] without tb/ or tensorboard."""
    if not (run.folder / "tb").is_dir():
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # a declared dependency; a trimmed install still gets a report
        return []
    events = EventAccumulator(str(run.folder / "tb"), size_guidance={"tensors": 0, "scalars": 1})
    events.Reload()
    tags = [tag for tag in events.Tags().get("tensors", []) if tag.startswith("sample")]
    samples = []
    for tag in tags:
        for event in events.Tensors(tag):
            values = event.tensor_proto.string_val
            if values:
                samples.append((event.step, values[0].decode("utf-8", errors="replace")))
    return sorted(samples)


def is_decoder_folder(run: Run) -> bool:
    """A folder of an fp32 (or fp16/bf16) causal LM that the report can load and sample."""
    return (
        model_architecture(run).endswith("ForCausalLM")
        and any(run.has(name) for name in WEIGHTS)
        and not run.has("quantization.json")  # llmk's integer layout: `llmk serve` runs those as stored
    )


def prompt_ids(run: Run, tokenizer: Any, count: int) -> list[list[int]]:
    """The first tokens of the run's first validation documents, or fixed prompts without a data folder."""
    data = run.config.get("data")
    if isinstance(data, str) and (Path(data) / "shards.json").is_file():
        from llmkernel.io.shards import TokenShards

        try:
            documents = TokenShards(data, "val").iter_documents()
            prompts = [doc[:PROMPT_TOKENS].tolist() for doc, _ in zip(documents, range(count)) if len(doc)]
        except (InputError, IndexError):
            prompts = []
        if prompts:
            return prompts
    return [tokenizer(text)["input_ids"] for text in FIXED_PROMPTS[:count]]


def continuations(run: Run, count: int, new_tokens: int, seed: int) -> list[list[str]]:
    """[prompt, greedy continuation, sampled continuation] for `count` prompts of a decoder folder; prompt
    i is sampled with seed `seed + i`."""
    import torch
    from transformers import GenerationConfig

    from llmkernel.models.loading import load_model, load_tokenizer_for

    model = load_model(run.folder, "decoder").eval()
    tokenizer = load_tokenizer_for(run.folder)
    settings = {"max_new_tokens": new_tokens, "pad_token_id": tokenizer.pad_token_id}
    settings["eos_token_id"] = tokenizer.eos_token_id
    greedy = GenerationConfig(do_sample=False, **settings)
    sampled = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, **settings)
    rows = []
    for index, ids in enumerate(prompt_ids(run, tokenizer, count)):
        inputs = torch.tensor([ids])
        texts = [tokenizer.decode(ids, skip_special_tokens=True)]
        for config in (greedy, sampled):
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
                torch.manual_seed(seed + index)
                output = model.generate(
                    inputs, attention_mask=torch.ones_like(inputs), generation_config=config
                )
            # special tokens kept: an end-of-text token says the model stopped, not that it wrote nothing
            texts.append(tokenizer.decode(output[0, len(ids) :].tolist()))
        rows.append(texts)
    return rows


def _eval_samples(report: dict[str, Any]) -> Table | None:
    samples = [s for s in report.get("samples") or [] if isinstance(s, dict)]
    if not samples:
        return None
    return Table(
        ["prompt", "reference", "reply"],
        [[s.get("prompt", ""), s.get("reference", ""), s.get("reply", "")] for s in samples],
    )


def _run_blocks(run: Run, count: int, new_tokens: int, seed: int) -> list:
    blocks: list = []
    logged = logged_samples(run)
    if logged:
        blocks += [
            Text(
                f"Logged by the training loop at its evaluations (sampled, temperature {TEMPERATURE}, top-k {TOP_K}):"
            ),
            Table(["step", "sample"], [[step, text] for step, text in logged]),
        ]
    table = _eval_samples(run.read_json("eval.json") or {})
    if table is not None:
        blocks += [Text("Sample replies in eval.json:"), table]
    if count and is_decoder_folder(run):
        rows = continuations(run, count, new_tokens, seed)
        blocks += [
            Text(
                f"Generated by this report: {new_tokens} new tokens at most, greedy and sampled "
                f"(temperature {TEMPERATURE}, top-k {TOP_K}, seed {seed} + the prompt's index):"
            ),
            Table(["prompt", "greedy", "sampled"], rows),
        ]
    return [Heading(run.label), *blocks] if blocks else []


def generations_section(runs: list[Run], count: int, new_tokens: int, seed: int) -> Section | None:
    blocks = []
    for run in runs:
        blocks += _run_blocks(run, count, new_tokens, seed)
    if not blocks:
        return None
    return Section(
        "generations",
        "Sample generations",
        "What the decoders write: samples logged during training, sample replies of evaluations, and "
        "continuations generated by this report (each labelled with where it comes from).",
        blocks,
    )
