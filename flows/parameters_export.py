"""The `export` section of the save-adapter flow's parameters: the optional merged full model (export-merged step).

Descriptions are the Prefect form's field help (rendered as markdown): no angle brackets, backticks, asterisks or
underscore emphasis (tests/pipeline/test_parameter_schema.py).
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

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
    max_shard_size: Union[int, str] = Field(
        "5GB", json_schema_extra={"pattern": SHARD_SIZE_PATTERN, "minimum": 1},  # the Prefect server checks it too
        description="largest safetensors shard of the merged model: a whole number and GB, MB, KB, GiB, MiB or KiB, "
                    "e.g. 5GB, or a whole number of bytes, e.g. 1000000 (as transformers' save_pretrained takes it)")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="dtype of the merged weights; default: base_model.dtype")

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _shard_size(cls, value):
        """A str with a unit, or an int number of bytes >= 1 (transformers' convert_file_size_to_int takes both)."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("a number of bytes must be at least 1; or use a unit, e.g. 5GB")
            return value
        if not (isinstance(value, str) and re.match(SHARD_SIZE_PATTERN, value)):
            raise ValueError("use a whole number of bytes with a unit: GB, MB, KB, GiB, MiB or KiB, e.g. 5GB or "
                             "500MB (transformers reads a lowercase b as bits), or a whole number of bytes, e.g. "
                             "1000000")
        return value
