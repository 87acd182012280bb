"""The README.md model card written next to saved adapters.

Like PEFT's, it starts with YAML front matter that the Hub reads (base_model, library_name: peft, pipeline_tag,
tags). The core writes YAML by hand (JSON-quoted scalars are valid YAML) so it needs no YAML library. A card
that already exists is never rewritten: only the metadata keys it lacks are added, so a user's own text stays.
"""

from __future__ import annotations

import json
from typing import Mapping

from adapterflow.config import LoraConfig

# PEFT's TaskType -> Hub pipeline tag.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def card_metadata(configs: Mapping[str, LoraConfig]) -> dict[str, object]:
    """The front matter PEFT writes: base_model, library_name, pipeline_tag (when known) and tags."""
    config = next(iter(configs.values()))
    base = config.base_model_name_or_path
    metadata: dict[str, object] = {}
    if base:
        metadata["base_model"] = base
    metadata["library_name"] = "peft"
    if config.task_type in PIPELINE_TAGS:
        metadata["pipeline_tag"] = PIPELINE_TAGS[config.task_type]
    tags = [f"base_model:adapter:{base}"] if base else []
    metadata["tags"] = tags + ["lora", "transformers"]
    return metadata


def render_model_card(configs: Mapping[str, LoraConfig], existing: str | None = None) -> str:
    """README.md text for a save directory holding `configs` (adapter name -> config)."""
    metadata = card_metadata(configs)
    if existing is not None:
        return _add_missing_metadata(existing, metadata)
    rows = "\n".join(
        f"| {name} | {c.r} | {c.lora_alpha} | {_targets(c)} | {c.init_lora_weights} |" for name, c in configs.items()
    )
    base = metadata.get("base_model", "an unnamed base model")
    return (
        f"{_front_matter(metadata)}\n"
        f"# LoRA adapter for {base}\n\n"
        f"Adapter weights only; load them on top of the base model with PEFT:\n\n"
        f"```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"<this folder or repo>\")\n```\n\n"
        f"| adapter | r | lora_alpha | target modules | init |\n|---|---|---|---|---|\n{rows}\n"
    )


def _targets(config: LoraConfig) -> str:
    targets = config.target_modules
    return ", ".join(targets) if isinstance(targets, list) else str(targets)


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
