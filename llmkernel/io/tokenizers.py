"""Tokenizer folders: loading the fast tokenizer that `llmk prepare` wrote (or any HF tokenizer folder)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import models

from llmkernel.errors import InputError, first_line

if TYPE_CHECKING:  # transformers imports torch (~2 s): only the functions that need it import it
    from transformers import PreTrainedTokenizerFast

EXPECTED_FILES = "tokenizer.json and tokenizer_config.json (or a vocab.txt / vocab.json + merges.txt)"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the fast tokenizer saved in folder `path`; InputError when there is none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"tokenizer folder {path} does not exist: pass a folder that holds {EXPECTED_FILES}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as error:  # what transformers raises for unusable folders
        raise InputError(
            f"no loadable tokenizer in {path} ({first_line(error)}): the folder needs {EXPECTED_FILES}"
        ) from None
    if not tokenizer.is_fast:
        raise InputError(
            f"the tokenizer in {path} has no fast (Rust) version: the folder needs {EXPECTED_FILES}"
        )
    return tokenizer


def document_separator_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The token written between documents: eos for decoders, [SEP] for WordPiece encoders."""
    if isinstance(tokenizer.backend_tokenizer.model, models.WordPiece):
        candidates = (tokenizer.sep_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        candidates = (tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    for token_id in candidates:
        if token_id is not None:
            return token_id
    raise InputError(
        f"tokenizer {tokenizer.name_or_path} has no eos, sep or pad token to separate documents: "
        "use one that defines an eos token"
    )
