"""`sft`: instruction / chat tuning of decoders, a task for the one loop.

Conversations are rendered with the model's chat template; only the assistant's tokens carry a loss (the
template's markup, system and user turns are context). With packing, conversations are concatenated into
rows of `max_length` tokens (no padding, as in the HF TRL's packing); without it, each is a row and batches
are length-grouped and dynamically padded. The LM head runs only at the positions that carry a loss.

A table of pairs (tsv/csv/parquet with source and target columns, e.g. a translation set) is read as
one-turn conversations: `--data.prompt_template` with {source} filled in is the user turn, the target the
reply. Then the final report also scores the greedy replies against the targets (sacreBLEU BLEU and chrF),
so a decoder and an encoder-decoder (`seq2seq`) compare on the same split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkernel.errors import InputError
from llmkernel.io.chat import read_chat
from llmkernel.io.pairs import as_conversations, check_tokenizer_covers, read_pairs
from llmkernel.tasks.base import IGNORE, SupervisedTask, default_max_length, read_train_and_eval
from llmkernel.tasks.metrics import translation_scores

PAIR_TABLES = (".tsv", ".csv", ".parquet")  # files read as (source, target) pairs rather than chats


def is_pair_table(path: str | Path) -> bool:
    return any(suffix in PAIR_TABLES for suffix in Path(path).suffixes[-2:])  # train.tsv, train.tsv.gz


def read_conversations(
    path: str, source_column: str | None, target_column: str | None, template: str, tokenizer=None
) -> list[list[dict[str, str]]]:
    """The conversations of a chat file, or of a table of pairs (the template's user turn, the target reply)."""
    if not is_pair_table(path):
        return read_chat(path)
    pairs = read_pairs(path, source_column, target_column)
    if tokenizer is not None:
        check_tokenizer_covers(tokenizer, pairs.sources[:2000], f"{path} ({pairs.source_column})")
    return as_conversations(pairs, template)


# Used for tokenizers without a chat template (e.g. a decoder we pretrained): ChatML, as SmolLM2 uses.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class SelectedPositionsLM(torch.nn.Module):
    """A causal LM whose head runs only at given positions: the vocabulary projection is the most
    expensive layer of a small decoder (49k x 576 for SmolLM2) and most positions carry no loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.model.get_output_embeddings()(hidden.last_hidden_state[positions])  # (selected, vocab)


class ChatSFT(SupervisedTask):
    """Supervised fine-tuning on conversations, loss on assistant tokens only."""

    name = "sft"
    model_kind = "decoder"
    peft_task_type = "CAUSAL_LM"
    default_metric = "loss"
    metrics = ("loss", "perplexity")
    headline = ("loss", "perplexity", "bleu", "chrf")  # BLEU and chrF when the evaluation set is pairs
    attackable = False
    uses_class_weights = False

    def __init__(
        self, tokenizer, max_length: int, batch_size: int, seed: int = 0, packing: bool = True
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, seed)
        self.packing = packing
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.pad_id
        self.eval_conversations: list[list[dict[str, str]]] = []
        self.scores_replies = False  # the evaluation set is a table of pairs: score replies with BLEU/chrF

    @property
    def example_unit(self) -> str:
        return "rows (packed conversations)" if self.packing else "examples"

    @classmethod
    def accepts(cls, path: str | Path) -> bool:
        return Path(path).suffix in (".jsonl", ".json", *PAIR_TABLES)

    @classmethod
    def from_training_files(
        cls, tokenizer, model_config, data: Any, seed: int, batch_size: int, max_length: int
    ):
        """The task with the chat files `data.train` (and `data.eval`, or a held-out share) encoded."""
        columns = (data.source_column, data.target_column, data.prompt_template, tokenizer)
        train, evaluation = read_train_and_eval(lambda path: read_conversations(path, *columns), data, seed)
        task = cls(tokenizer, max_length, batch_size, seed, packing=data.packing)
        if not max_length:  # rendering chat templates is slow: count the first 2,000; at most 2,048
            counted = [len(task.encode_conversation(c)["input_ids"]) for c in train[:2000]]
            task.max_length = default_max_length(counted, model_config, data.train, limit=2048)
        task.set_data(train, evaluation)
        task.scores_replies = is_pair_table(data.eval or data.train)
        return task

    @classmethod
    def for_evaluation(
        cls, path: str, model, tokenizer, max_length: int, batch_size: int, columns: dict, limit: int
    ):
        """The task with the conversations of `path` as its evaluation set."""
        template = columns.get("prompt_template") or "{source}"
        conversations = read_conversations(
            path, columns.get("source_column"), columns.get("target_column"), template, tokenizer
        )[: limit or None]
        task = cls(tokenizer, max_length, batch_size)
        task.eval, task.eval_conversations = task.encode(conversations, pack=False), conversations
        task.scores_replies = is_pair_table(path)
        return task

    @classmethod
    def head_modules(cls, model: torch.nn.Module) -> list[str]:
        return []  # the LM head is the model's own (tied to the embeddings in small decoders)

    def final_report(
        self, model: torch.nn.Module, device: torch.device, sample_tokens: int
    ) -> dict[str, Any]:
        report = self.report(model, device)
        report["samples"] = self.samples(model, device, sample_tokens)
        if self.scores_replies and self.eval_conversations:  # pairs: BLEU and chrF of every reply
            replies = self.answers(model, device, self.eval_conversations, sample_tokens)
            references = [c[-1]["content"] for c in self.eval_conversations]
            report.update(translation_scores(replies, references))
            for sample, reply in zip(report["samples"], replies):
                sample["reply"] = reply
        return report

    @torch.no_grad()
    def answers(
        self,
        model,
        device: torch.device,
        conversations: Sequence[Sequence[dict[str, str]]],
        max_new_tokens: int,
    ) -> list[str]:
        """Greedy replies to many conversations (their last assistant turns left out), in left-padded
        batches, longest first; each ends at eos or the template's end of turn (<|im_end|>)."""
        model.eval()
        prompts = [c[:-1] if c[-1]["role"] == "assistant" else c for c in conversations]
        ids = [
            self.tokenizer(self.render(p, generation_prompt=True), add_special_tokens=False)["input_ids"]
            for p in prompts
        ]
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        stop = [self.eos_id] + ([end_of_turn] if end_of_turn != self.tokenizer.unk_token_id else [])
        order = np.argsort([-len(row) for row in ids], kind="stable")
        replies = [""] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = [ids[i] for i in order[start : start + self.batch_size]]
            longest = max(map(len, rows))
            input_ids = torch.tensor([[self.pad_id] * (longest - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
            output = model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=self.pad_id,
            )
            texts = self.tokenizer.batch_decode(output[:, longest:].tolist(), skip_special_tokens=True)
            for index, text in zip(order[start : start + self.batch_size], texts):
                replies[index] = text.strip()
        return replies

    def samples(self, model, device: torch.device, max_new_tokens: int, count: int = 3) -> list[dict]:
        """Greedy replies to the first evaluation prompts, next to the reference replies."""
        samples = []
        for messages in self.eval_conversations[:count]:
            reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
            samples.append(
                {
                    "prompt": messages[-2]["content"] if len(messages) > 1 else "",
                    "reference": reference,
                    "reply": self.answer(model, device, messages, max_new_tokens),
                }
            )
        return samples

    def render(self, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode_conversation(self, messages: Sequence[dict[str, str]]) -> dict[str, list[int]]:
        """Token ids of the rendered conversation and labels that are IGNORE outside assistant replies."""
        text = self.render(messages)
        spans = []  # character spans of the assistant replies (with their end-of-turn markup)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(self.render(messages[:index], generation_prompt=True))
                spans.append((start, len(self.render(messages[: index + 1]))))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [IGNORE] * len(ids)
        for position, (begin, _) in enumerate(encoded["offset_mapping"]):
            if any(start <= begin < end for start, end in spans):
                labels[position] = ids[position]
        return {"input_ids": ids, "labels": labels}

    def encode(self, conversations: Sequence[Sequence[dict[str, str]]], pack: bool) -> list[dict[str, Any]]:
        examples = [self.encode_conversation(c) for c in conversations]
        if not pack:
            return [{k: v[: self.max_length] for k, v in e.items()} for e in examples]
        order = np.random.default_rng(self.seed).permutation(len(examples))
        ids: list[int] = []
        labels: list[int] = []
        for index in order:  # conversations back to back, an end-of-text token between them
            ids += examples[index]["input_ids"] + [self.eos_id]
            labels += examples[index]["labels"] + [IGNORE]
        rows = range(0, len(ids), self.max_length)
        return [
            {"input_ids": ids[i : i + self.max_length], "labels": labels[i : i + self.max_length]}
            for i in rows
        ]

    def set_data(
        self, train: Sequence[Sequence[dict[str, str]]], evaluation: Sequence[Sequence[dict[str, str]]]
    ):
        self.set_train(self.encode(train, self.packing))
        self.eval = self.encode(evaluation, pack=False)
        self.eval_conversations = [list(c) for c in evaluation]
        if not any(label != IGNORE for e in self.train for label in e["labels"]):
            raise InputError(
                "no assistant tokens to learn from in the training data: add assistant turns (the replies to learn)"
            )

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return SelectedPositionsLM(model)

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().collate(examples)
        # Position t predicts token t+1: a loss where the next token is an assistant token.
        shifted = torch.full_like(batch["labels"], IGNORE)
        shifted[:, :-1] = batch["labels"][:, 1:]
        batch["positions"] = shifted != IGNORE
        batch["labels"] = shifted[batch["positions"]]
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])  # (selected, vocab)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    @torch.no_grad()
    def report(
        self, model: torch.nn.Module, device: torch.device, examples: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Loss and perplexity on the assistant tokens of the evaluation conversations."""
        model.eval()
        head = SelectedPositionsLM(model)
        examples = self.eval if examples is None else examples
        nats, tokens = 0.0, 0
        for _, batch in self.eval_batches(examples):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = head(batch["input_ids"], batch["attention_mask"], batch["positions"]).float()
            nats += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            tokens += batch["labels"].numel()
        loss = nats / max(1, tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "assistant_tokens": tokens}

    @torch.no_grad()
    def answer(
        self,
        model: torch.nn.Module,
        device: torch.device,
        messages: Sequence[dict[str, str]],
        max_new_tokens: int,
    ) -> str:
        """The model's greedy reply to a conversation (its last assistant turn left out)."""
        prompt = list(messages[:-1]) if messages[-1]["role"] == "assistant" else list(messages)
        ids = self.tokenizer(
            self.render(prompt, generation_prompt=True), add_special_tokens=False, return_tensors="pt"
        )
        output = model.generate(
            ids["input_ids"].to(device),
            attention_mask=ids["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        return self.tokenizer.decode(
            output[0, ids["input_ids"].shape[1] :].tolist(), skip_special_tokens=True
        )

    def sample(self, model: torch.nn.Module, device: torch.device, max_new_tokens: int) -> str:
        """The reply to the first evaluation conversation (shown at each evaluation)."""
        if not self.eval_conversations:
            return ""
        return self.answer(model, device, self.eval_conversations[0], max_new_tokens)
