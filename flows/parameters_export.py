"""The `export` section of the save-adapter flow's parameters: the optional merged full model (export-merged step).

Descriptions are the Prefect form's field help (rendered as markdown): no angle brackets, backticks, asterisks or
underscore emphasis (tests/pipeline/test_parameter_schema.py).
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

# transformers' convert_file_size_to_int units, bytes only: it reads a lowercase "b" (5Gb) as bits.
SHARD_SIZE_PATTERN = r"^[1-9][0-9]*(GB|MB|KB|GiB|MiB|KiB)$"


class ExportSettings(BaseModel):
    """Optional exports written after verification, before MLflow and the Hub."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silently ignored setting

    merged: bool = Field(
        False, description="also write the base model with the adapter merged in (W + scaling B A) to {run dir}/merged: "
                           "sharded safetensors, config and tokenizer files, loadable with "
                           "AutoModelForCausalLM.from_pretrained; its logits are checked against the verified adapter's")
    max_shard_size: str = Field(
        "5GB", json_schema_extra={"pattern": SHARD_SIZE_PATTERN},  # the Prefect server checks it too
        description="largest safetensors shard of the merged model: a whole number and GB, MB, KB, GiB, MiB or KiB, "
                    "e.g. 5GB")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="dtype of the merged weights; default: base_model.dtype")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        if not re.match(SHARD_SIZE_PATTERN, value):
            raise ValueError("use a whole number of bytes with a unit: GB, MB, KB, GiB, MiB or KiB, e.g. 5GB or "
                             "500MB (transformers reads a lowercase b as bits)")
        return value
