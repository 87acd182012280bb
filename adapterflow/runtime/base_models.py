"""Base models: a builtin tiny Llama built locally, or a transformers model folder on disk.

`builtin:tiny-llama` is built from `builtin/tiny-llama.json` with weights from a fixed seed and a byte-level BPE
tokenizer trained on `builtin/instructions.jsonl`, with the chat template `builtin/tiny-llama.chat_template.jinja`
(role markers `<|system|>`, `<|user|>`, `<|assistant|>` are special tokens; an assistant turn ends with `</s>`),
and saved once as a real transformers folder (config.json,
model.safetensors, tokenizer files) under the cache directory, so transformers, PEFT and adapterflow all load it
by path. Nothing is downloaded: a Hub repo id is refused with instructions to download the model first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

from adapterflow.atomic import fsync_dir, fsync_tree
from adapterflow.model_references import is_hub_model_id
from adapterflow.model_references import BUILTIN_PREFIX
from adapterflow.runtime.data_sources import BUILTIN_DIR

# name -> (config, tokenizer corpus, chat template)
BUILTIN_MODELS = {"tiny-llama": ("tiny-llama.json", "instructions.jsonl", "tiny-llama.chat_template.jinja")}
BUILD_VERSION = "2"  # bump when the build below changes, so cached folders are rebuilt under a new name
SEED = 0
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, as in the builtin configs
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")  # ids 4..6: the chat template's role markers
_BUILD_LOCK = threading.Lock()  # seeding is global to the process: one build at a time per process


def default_cache_dir() -> Path:
    """$ADAPTERFLOW_CACHE, else ~/.cache/adapterflow."""
    return Path(os.environ.get("ADAPTERFLOW_CACHE") or Path.home() / ".cache" / "adapterflow").expanduser()


def resolve_base_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of a base model, building a builtin one on first use.

    Args:
        name_or_path: `builtin:<name>` (e.g. `builtin:tiny-llama`), a local transformers model folder, or a Hub
            repo id (downloaded into the huggingface_hub cache; HF_ENDPOINT and HF_TOKEN apply).
        cache_dir: where builtin models are built (default: `default_cache_dir()`).

    Returns:
        The absolute path of a folder holding config.json (and weights and tokenizer files).

    Raises:
        ValueError: an unknown builtin name (the message lists the available ones).
        FileNotFoundError: the folder does not exist or has no config.json, or a Hub repo id cannot be downloaded.
        NotADirectoryError: the path is a file.
    """
    if "://" in name_or_path:
        raise FileNotFoundError(f"Base model {name_or_path!r} is a URL; pass a local transformers model folder, a Hub "
                                f"repo id (downloaded from HF_ENDPOINT) or one of {_builtin_names()}.")
    if name_or_path.startswith(BUILTIN_PREFIX):
        return _builtin(name_or_path[len(BUILTIN_PREFIX):], Path(cache_dir) if cache_dir else default_cache_dir())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Base model folder {path.resolve()} has no config.json, so it is not a "
                                    f"transformers model folder; pass the folder that model.save_pretrained() wrote.")
        return path.resolve()
    if path.exists():
        raise NotADirectoryError(f"Base model {path.resolve()} is a file; pass the model's folder instead.")
    if is_hub_model_id(name_or_path):
        return _download(name_or_path)
    raise FileNotFoundError(f"Base model {name_or_path!r} is neither an existing folder ({path.absolute()} does not "
                            f"exist) nor a Hub repo id (namespace/name); pass a local transformers model folder, a "
                            f"Hub repo id or one of {_builtin_names()}.")


def _download(repo_id: str) -> Path:
    """A Hub model's config, safetensors weights and tokenizer files, in the huggingface_hub cache."""
    from huggingface_hub import snapshot_download  # only for Hub ids: nothing else in the core needs the Hub

    try:
        return Path(snapshot_download(repo_id, endpoint=os.environ.get("HF_ENDPOINT") or None,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - any failure means: not available here
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise FileNotFoundError(_local_folder_hint(repo_id) +
            f"Base model {repo_id!r} is not a local folder and could not be downloaded from the Hub ({reason}). "
            f"Without access to the Hub, download it elsewhere (e.g. `hf download {repo_id} --local-dir "
            f"models/{repo_id.split('/')[-1]}`) and pass the local folder, or use {BUILTIN_PREFIX}tiny-llama."
        ) from None


def _local_folder_hint(repo_id: str) -> str:
    """When `namespace/` is a folder here, the user probably meant a folder in it: name what it holds."""
    namespace = Path(repo_id.split("/")[0])
    if not namespace.is_dir():
        return ""
    folders = sorted(p.name for p in namespace.iterdir() if p.is_dir())[:5]
    return (f"No folder {repo_id} here ({namespace}/ holds: {', '.join(folders) or 'no folders'}); if you meant a "
            f"local model, pass its folder. ")


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model folder.

    Args:
        path: a folder from `resolve_base_model`.

    Returns:
        `AutoTokenizer.from_pretrained(path)`.

    Raises:
        OSError: the folder holds no tokenizer files.
    """
    return AutoTokenizer.from_pretrained(str(path))


def load_base_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> PreTrainedModel:
    """The causal LM saved in a model folder.

    Args:
        path: a folder from `resolve_base_model`.
        dtype: dtype of the weights.
        device: where the model goes.

    Returns:
        The model in eval mode, with `model.name_or_path == str(path)`: adapters record that path as their
        base_model_name_or_path.

    Raises:
        OSError: the folder holds no loadable weights.
    """
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    model.name_or_path = str(path)
    return model.eval()


def meta_base_model(path: str | os.PathLike) -> PreTrainedModel:
    """The causal LM of a model folder built on the meta device from its config.json: every module and weight
    shape, no weights read or allocated (for target matching and the manifest's base fingerprint)."""
    with torch.device("meta"), no_progress_bars():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    model.name_or_path = str(path)
    return model


def _builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + name for name in BUILTIN_MODELS]


def _builtin(name: str, cache_dir: Path) -> Path:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"Unknown builtin base model {BUILTIN_PREFIX + name!r}; available: {_builtin_names()}.")
    config_bytes, corpus_bytes, template_bytes = ((BUILTIN_DIR / file).read_bytes() for file in BUILTIN_MODELS[name])
    parts = [config_bytes, corpus_bytes, template_bytes, BUILD_VERSION.encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]
    target = (cache_dir / f"{name}-{digest}").absolute()
    if not (target / "config.json").is_file():
        _build(json.loads(config_bytes), _corpus(corpus_bytes), target, template_bytes.decode())
    return target


def _corpus(jsonl: bytes) -> list[str]:
    """The texts a builtin tokenizer is trained on: prompt + completion of every record."""
    records = [json.loads(line) for line in jsonl.decode().splitlines() if line.strip()]
    return [r.get("text") or r.get("prompt", "") + r.get("completion", "") for r in records]


def build_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, nothing maps to <unk>; digits are split one by one, as in
    Llama) trained deterministically on `texts`.

    Args:
        texts: the training corpus.
        vocab_size: the exact vocabulary size: 7 special tokens (4 + 3 role markers) + 256 bytes + merges.
        model_max_length: the longest input the model takes (its max_position_embeddings).

    Returns:
        A PreTrainedTokenizerFast with <pad>/<s>/</s>/<unk> = ids 0..3, the role markers ids 4..6, <s> prepended
        by default, right padding; no chat template (the caller sets one).

    Raises:
        RuntimeError: the texts are too small to learn `vocab_size` tokens.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *ROLE_TOKENS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    if bpe.get_vocab_size() != vocab_size:
        raise RuntimeError(f"The tokenizer corpus yields {bpe.get_vocab_size()} tokens, not vocab_size={vocab_size}; "
                           f"lower vocab_size in the config or enlarge the corpus.")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="right", model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def _build(config: dict, texts: list[str], target: Path, chat_template: str) -> None:
    """Build the model folder in a temp folder next to `target` and rename it into place: a crash leaves no
    half-built `target`, and of two concurrent builders the loser discards its copy and uses the winner's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        tokenizer = build_tokenizer(texts, config["vocab_size"], config["max_position_embeddings"])
        tokenizer.chat_template = chat_template
        for key, token in [("pad_token_id", "<pad>"), ("bos_token_id", "<s>"), ("eos_token_id", "</s>")]:
            if config.get(key) != tokenizer.convert_tokens_to_ids(token):
                raise ValueError(f"The builtin config's {key}={config.get(key)} is not the tokenizer's {token} id.")
        model_config = AutoConfig.for_model(**config)
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        with no_progress_bars():
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp creates it 0700
        fsync_tree(staging)
        try:
            os.rename(staging, target)
        except OSError as exc:
            if not (target / "config.json").is_file():
                raise FileExistsError(f"{target} exists but holds no config.json; delete it to rebuild.") from exc
            shutil.rmtree(staging)  # another process finished first; its folder is identical
        else:
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") for a tiny local model."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
