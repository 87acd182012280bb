"""The README.md model card of a saved adapter: the one renderer, for the output folder and for the Hub.

Like PEFT's card it starts with YAML front matter that the Hub reads, then markdown: what the adapter is, how to
load it, the adapter configuration and, when known, a training summary. Two metadata policies, chosen by
whether publishing inputs (`ModelCardInfo`) are given:

- plain `save_pretrained` (no info): PEFT's metadata (peft `utils/other.py` / `PeftModel.create_or_update_model_card`):
  base_model as configured, library_name peft, pipeline_tag, tags `base_model:adapter:<base>`, lora, transformers.
- publishing (`ModelCardInfo`, the pipeline's save step and `push_to_hub`): the Hub's metadata rules
  (huggingface_hub ModelCardData): base_model only when it is a Hub repo id (the Hub rejects a local path there),
  tags lora, peft, adapterflow plus the user's, license and datasets when given.

The YAML is written by hand (JSON-quoted scalars are valid YAML), so the library needs no YAML or Hub library.
A card that already exists is never rewritten: only the metadata keys it lacks are added, so a user's text stays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from adapterflow import formats
from adapterflow.config import LoraConfig
from adapterflow.model_references import BUILTIN_PREFIX, is_hub_model_id

# PEFT's TaskType -> Hub pipeline tag.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
DEFAULT_TAGS = ("lora", "peft", "adapterflow")
MERGED_TAGS = ("adapterflow", "lora", "merged-lora")
_TRAINING_LABELS = {"steps": "steps", "final_loss": "final training loss",
                    "eval_loss_before": "eval loss before training", "eval_loss_after": "eval loss after training"}


@dataclass(frozen=True)
class ModelCardInfo:
    """What a published card says beyond the adapter configs.

    base_model: the base as the user named it (default: the config's base_model_name_or_path); Hub metadata
        only when it is a Hub repo id. license, datasets: Hub metadata. tags: added to DEFAULT_TAGS.
    training: summary shown as a table (steps, final_loss, eval_loss_before, eval_loss_after, other scalars).
    repo_id: the Hub repo, for the loading snippet.
    notes: sentences shown under the introduction, e.g. conversion_note's.
    """

    base_model: Optional[str] = None
    license: Optional[str] = None
    datasets: Sequence[str] = ()
    tags: Sequence[str] = ()
    training: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    repo_id: Optional[str] = None
    notes: Sequence[str] = ()


def conversion_note(trained_r: int, saved_r: int) -> str:
    """Why a converted PiSSA adapter's rank is twice the trained one: the PiSSA->LoRA conversion stores the
    trained factors next to the initial ones, [B, -B0] @ [A; A0] (peft `PeftModel.save_pretrained`,
    path_initial_model_for_weight_conversion), so the saved r is 2r and the adapter applies to the original base."""
    return (f"trained as PiSSA r={trained_r}; saved as LoRA r={saved_r} (PiSSA->LoRA conversion doubles the rank), "
            f"so it loads on the original base model")


def card_metadata(configs: Mapping[str, LoraConfig], info: Optional[ModelCardInfo] = None) -> dict[str, object]:
    """The front matter: PEFT's without `info`, the Hub's with it (see the module docstring)."""
    config = next(iter(configs.values()))
    metadata: dict[str, object] = {}
    if info is None:
        base = config.base_model_name_or_path
        metadata.update({"base_model": base} if base else {})
        metadata["library_name"] = "peft"
        metadata.update({"pipeline_tag": PIPELINE_TAGS[config.task_type]} if config.task_type in PIPELINE_TAGS else {})
        metadata["tags"] = ([f"base_model:adapter:{base}"] if base else []) + ["lora", "transformers"]
        return metadata
    hub_base = _hub_base(config, info)
    metadata.update({"base_model": hub_base} if hub_base else {})
    metadata.update({"datasets": list(info.datasets)} if info.datasets else {})
    metadata["library_name"] = "peft"
    metadata.update({"license": info.license} if info.license else {})
    metadata["pipeline_tag"] = PIPELINE_TAGS.get(config.task_type or "CAUSAL_LM")
    tags = [*DEFAULT_TAGS, *info.tags, *([f"base_model:adapter:{hub_base}"] if hub_base else [])]
    metadata["tags"] = list(dict.fromkeys(tags))
    return {k: v for k, v in metadata.items() if v is not None}


def render_model_card(configs: Mapping[str, LoraConfig], existing: Optional[str] = None,
                      info: Optional[ModelCardInfo] = None) -> str:
    """README.md text for a save directory holding `configs` (adapter name -> config).

    Args:
        configs: the adapters of the folder, "default" first when present.
        existing: the folder's current README.md, if any: kept, gaining only missing metadata keys.
        info: publishing inputs (see ModelCardInfo); None for PEFT's plain save_pretrained card.
    """
    metadata = card_metadata(configs, info)
    if existing is not None:
        return _add_missing_metadata(existing, metadata)
    config = next(iter(configs.values()))
    base = (info.base_model if info else None) or config.base_model_name_or_path
    hub_base = _hub_base(config, info or ModelCardInfo())
    name = hub_base or base_model_label(base)
    about = _about(base, hub_base, name)
    load = (f"resolve_base_model({json.dumps(base)})" if base and base.startswith(BUILTIN_PREFIX) else
            json.dumps(hub_base or f"<path to {name or 'the base model'}>"))
    imports = ("from adapterflow.runtime.base_models import resolve_base_model\n"
               if base and base.startswith(BUILTIN_PREFIX) else "")
    notes = "".join(f"{note[:1].upper()}{note[1:]}.\n\n" for note in (info.notes if info else ()))
    auto = "AutoModelForCausalLM" if metadata.get("pipeline_tag", "text-generation") == "text-generation" else "AutoModel"
    rows = "\n".join(_row(adapter, c.r, c.lora_alpha, c.target_modules, c.init_lora_weights)
                     for adapter, c in configs.items())
    body = (
        f"# LoRA adapter for {name or 'a base model'}\n\n"
        f"A LoRA adapter made with adapterflow for {about}. It holds the adapter weights only, in PEFT's "
        f"format; load it on top of the base model.\n\n{notes}## Usage\n\n"
        f"```python\nfrom peft import PeftModel\nfrom transformers import {auto}\n{imports}\n"
        f"base = {auto}.from_pretrained({load})\n"
        f"model = PeftModel.from_pretrained(base, {json.dumps((info and info.repo_id) or '<this folder or repo>')})\n"
        f"```\n\n## Adapter configuration\n\n| adapter | r | lora_alpha | target modules | init |\n"
        f"|---|---|---|---|---|\n{rows}\n"
    )
    return f"{_front_matter(metadata)}\n{body}{_training_section(info.training if info else None)}"


def render_merged_model_card(configs: Mapping[str, LoraConfig], info: ModelCardInfo) -> str:
    """README.md of a merged model folder (the export-merged step; the Hub card of hub.merged_repo_id): a full
    transformers model, library_name transformers, base_model (and base_model_relation finetune) when the base is
    a Hub repo id, the merged adapter's configuration and the training summary.

    Args:
        configs: the merged adapter's config ({"default": config}). info: as for render_model_card; repo_id is the
            merged model's repo.
    """
    config = next(iter(configs.values()))
    adapter_metadata = card_metadata(configs, info)
    hub_base = adapter_metadata.get("base_model")
    metadata = {**({"base_model": hub_base, "base_model_relation": "finetune"} if hub_base else {}),
                **{k: adapter_metadata[k] for k in ("datasets", "license", "pipeline_tag") if k in adapter_metadata},
                "library_name": "transformers",
                "tags": list(dict.fromkeys([*MERGED_TAGS, *info.tags]))}
    base = info.base_model or config.base_model_name_or_path
    name = hub_base or base_model_label(base)
    notes = "".join(f"{note[:1].upper()}{note[1:]}.\n\n" for note in info.notes)
    rows = "\n".join(_row(adapter, c.r, c.lora_alpha, c.target_modules, c.init_lora_weights)
                     for adapter, c in configs.items())
    where = json.dumps(info.repo_id or "<this folder or repo>")
    body = (
        f"# {name or 'A base model'} with a merged LoRA adapter\n\n"
        f"This is {_about(base, hub_base, name)} with a LoRA adapter made with adapterflow merged into its "
        f"weights: every adapted weight W is W + scaling * B @ A (PEFT's merge_and_unload), so it is a full model "
        f"that loads without PEFT.\n\n{notes}## Usage\n\n"
        f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({where})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where})\n"
        f"```\n\n## Merged adapter\n\n| adapter | r | lora_alpha | target modules | init |\n"
        f"|---|---|---|---|---|\n{rows}\n"
    )
    return f"{_front_matter(metadata)}\n{body}{_training_section(info.training)}"


def build_model_card(adapter_dir: str | os.PathLike, *, base_model: Optional[str] = None,
                     license: Optional[str] = None, datasets: Optional[Sequence[str]] = None,
                     tags: Optional[Sequence[str]] = None, training: Optional[Mapping[str, Any]] = None,
                     repo_id: Optional[str] = None) -> str:
    """The published card (ModelCardInfo's arguments) for a saved adapter folder, ignoring its current README.

    Raises:
        FileNotFoundError: no adapter_config.json in adapter_dir or its adapter subfolders.
    """
    info = ModelCardInfo(base_model=base_model, license=license, datasets=tuple(datasets or ()),
                         tags=tuple(tags or ()), training=training, repo_id=repo_id)
    return render_model_card(read_configs(Path(adapter_dir)), info=info)


def read_configs(folder: Path) -> dict[str, LoraConfig]:
    """The adapter configs of a save_pretrained folder: "default" at the root, others in `<name>/`.

    Raises:
        FileNotFoundError: there is none (the folder is no saved adapter).
    """
    paths = [(formats.DEFAULT_ADAPTER_NAME, folder)]
    paths += [(p.parent.name, p.parent) for p in sorted(folder.glob(f"*/{formats.CONFIG_NAME}"))]
    configs = {name: LoraConfig.from_pretrained(path) for name, path in paths if (path / formats.CONFIG_NAME).is_file()}
    if not configs:
        raise FileNotFoundError(f"No {formats.CONFIG_NAME} in {folder} or its subfolders: not a saved adapter folder.")
    return configs


def base_model_label(base: Optional[str]) -> Optional[str]:
    """The base model as a card (or MLflow) names it: `builtin:NAME` and Hub ids as given, a local folder by its
    folder name (never a machine-local path such as a cache folder)."""
    if not base or base.startswith(BUILTIN_PREFIX) or is_hub_model_id(base):
        return base
    return Path(base.rstrip("/")).name or base


def _about(base: Optional[str], hub_base: Optional[str], name: Optional[str]) -> str:
    if hub_base:
        return f"`{hub_base}`"
    if not base:
        return "a model"
    if base.startswith(BUILTIN_PREFIX):
        return f"adapterflow's builtin base model `{name}` (built locally, not a Hub repo)"
    return f"the local base model `{name}` (not a Hub repo)"


def _hub_base(config: LoraConfig, info: ModelCardInfo) -> Optional[str]:
    base = info.base_model or config.base_model_name_or_path
    return base if base and is_hub_model_id(base) else None


def _training_section(training: Optional[Mapping[str, Any]]) -> str:
    if not training:
        return ""
    rows = [(label, training[key]) for key, label in _TRAINING_LABELS.items() if training.get(key) is not None]
    rows += [(k, v) for k, v in training.items() if k not in _TRAINING_LABELS and isinstance(v, (int, float, str))]
    return "\n## Training\n\n| | |\n|---|---|\n" + "".join(
        _row(label, f"{value:.4f}" if isinstance(value, float) else value) + "\n" for label, value in rows)


def _row(*cells: Any) -> str:
    text = (", ".join(sorted(c)) if isinstance(c, (list, set, tuple)) else str(c) for c in cells)
    return "| " + " | ".join(t.replace("|", "\\|").replace("\n", " ") for t in text) + " |"


def _front_matter(metadata: Mapping[str, object]) -> str:
    return "---\n" + "".join(_yaml_entry(k, v) for k, v in metadata.items()) + "---\n"


def _yaml_entry(key: str, value: object) -> str:
    if isinstance(value, list):
        return f"{key}:\n" + "".join(f"- {json.dumps(item)}\n" for item in value)
    return f"{key}: {json.dumps(value)}\n"


def _add_missing_metadata(text: str, metadata: Mapping[str, object]) -> str:
    """Add top-level front-matter keys the card lacks; keep everything the card already says."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return _front_matter(metadata) + "\n" + text
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        return _front_matter(metadata) + "\n" + text
    present = {line.split(":", 1)[0].strip() for line in lines[1:end] if line[:1] not in (" ", "-", "#") and ":" in line}
    missing = "".join(_yaml_entry(k, v) for k, v in metadata.items() if k not in present)
    return "".join(lines[:end]) + missing + "".join(lines[end:])
