"""Chat files for `sft`: jsonl (or a json list) of conversations in the OpenAI, prompt/response or Alpaca shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkernel.errors import InputError
from llmkernel.io.tables import read_rows

CHAT_ROLES = ("system", "user", "assistant")
CHAT_SHAPES = (
    '"messages" (a list of {"role", "content"}), "prompt" + "response", '
    'or "instruction" (+ "input") + "output"'
)


def read_chat(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from jsonl (or a json list) as lists of {"role", "content"} messages.

    A record holds `messages` (OpenAI shape, roles system/user/assistant), `prompt` + `response`, or
    Alpaca's `instruction` (+ optional `input`) + `output`; the last two become one user and one assistant
    message. Every conversation must contain an assistant message: that is what fine-tuning learns.
    """
    table = read_rows(Path(path))
    return [_conversation(table.where(index), row) for index, row in enumerate(table.rows)]


def _conversation(where: str, record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise InputError(f'{where}: \'messages\' must be a list of {{"role", "content"}} objects')
        conversation = [_message(where, position, message) for position, message in enumerate(messages, 1)]
    elif "prompt" in record and "response" in record:
        conversation = [
            _message(where, 1, {"role": "user", "content": record["prompt"]}, "prompt"),
            _message(where, 2, {"role": "assistant", "content": record["response"]}, "response"),
        ]
    elif "instruction" in record and "output" in record:
        instruction, extra = record["instruction"], record.get("input")
        if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        elif extra is not None and not isinstance(extra, str):
            raise InputError(f"{where}: 'input' is a {type(extra).__name__}, expected a string")
        conversation = [
            _message(where, 1, {"role": "user", "content": instruction}, "instruction"),
            _message(where, 2, {"role": "assistant", "content": record["output"]}, "output"),
        ]
    else:
        keys = ", ".join(map(repr, record)) or "none"
        raise InputError(f"{where}: unknown record shape (keys: {keys}); expected {CHAT_SHAPES}")
    if not any(message["role"] == "assistant" for message in conversation):
        raise InputError(f"{where}: no assistant message; each conversation needs a reply to learn from")
    return conversation


def _message(where: str, position: int, message: Any, key: str = "") -> dict[str, str]:
    name = f"'{key}'" if key else f"message {position}"
    if not isinstance(message, dict):
        raise InputError(f'{where}: {name} is a {type(message).__name__}, expected {{"role", "content"}}')
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise InputError(f"{where}: {name} has role {role!r}; roles are {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise InputError(f"{where}: {name} content is {type(content).__name__}, expected a string")
    return {"role": role, "content": content}
