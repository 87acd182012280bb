"""The merged export: the base model with the saved adapter merged in, as a transformers model folder.

The adapter is read from the saved adapter folder, so the merged model is built from exactly the files that
verification checked, and the folder is published only after transformers loads it back with the logits of
base + adapter: a merged model that differs is never written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM

from adapterflow import formats
from adapterflow.atomic import staged_directory
from adapterflow.merge import merge_adapter
from adapterflow.model import AdapterModel
from adapterflow.runtime.base_models import no_progress_bars, load_base_model, load_tokenizer

FP32_ATOL = 1e-5  # fp32 base and export: the merge is exact up to the order of fp32 sums


class MergedExportError(ValueError):
    """The merged model does not reproduce base + adapter; nothing was written. Permanent: not retried."""

    transient = False


@torch.no_grad()
def export_merged_model(base_path: str | os.PathLike, adapter_dir: str | os.PathLike, target: str | os.PathLike,
                        probe: dict[str, torch.Tensor], *, base_dtype: torch.dtype, atol: float,
                        dtype: Optional[torch.dtype] = None, max_shard_size: Union[int, str] = "5GB",
                        adapter_name: str = formats.DEFAULT_ADAPTER_NAME, card: Optional[str] = None) -> dict:
    """Merge the saved adapter into the base model and write it to `target` atomically, checked.

    Steps: 1. load the base in `base_dtype` and the adapter from `adapter_dir` with our loader (what verification
    does) and compute its logits on the probe; 2. merge (adapterflow.merge.merge_adapter; rounded once to
    `dtype`); 3. into a staging folder next to `target`: transformers' `save_pretrained` (sharded safetensors, at
    most `max_shard_size` each, config.json, generation_config.json), the base's tokenizer files, `card` as
    README.md; 4. load the staging folder with `AutoModelForCausalLM.from_pretrained` (its saved dtype) and
    compare its probe logits with step 1's; 5. only then swap the folder in as `target` (adapterflow.atomic).

    Args:
        base_path: the base model folder the adapter was verified on (the original base).
        adapter_dir: the saved adapter folder.
        target: the folder to create or replace, e.g. {run dir}/merged.
        probe: {"input_ids", "attention_mask"}: int64 (batch, seq), the run's probe batch.
        base_dtype: dtype the base is loaded in (the run's base_model.dtype). dtype: of the merged weights
            (default base_dtype).
        atol: largest allowed |logit difference| (fp32: FP32_ATOL; 16-bit: the verify tolerance).
        max_shard_size: transformers' size string, e.g. "5GB", or an int number of bytes. card: README.md text,
            or None for none.

    Returns:
        {"path", "bytes" (all files), "shards" (safetensors files), "dtype", "max_abs_diff", "atol"}.

    Raises:
        MergedExportError: the reloaded model's logits differ by more than atol (target left as it was).
        OSError: a write failed (the message names target).
    """
    dtype = dtype or base_dtype
    # the verified base weights, in `dtype`; one model in memory at a time (the merge works in place)
    model = AdapterModel.from_pretrained(load_base_model(base_path, dtype=base_dtype).to(dtype), adapter_dir,
                                         adapter_name=adapter_name)
    expected = model(**probe).logits.float()
    merged = merge_adapter(model, adapter_name=adapter_name)
    del model
    target = Path(target)
    with staged_directory(target, keep=lambda rel: False) as staging:  # old files of target are dropped
        with no_progress_bars():
            merged.save_pretrained(staging, max_shard_size=max_shard_size)
        del merged  # the last reference: freed before the reload, so the export's peak is one model, not two
        load_tokenizer(base_path).save_pretrained(staging)
        if card is not None:
            (staging / formats.MODEL_CARD_NAME).write_text(card)
        with no_progress_bars():
            reloaded = AutoModelForCausalLM.from_pretrained(str(staging)).eval()
        diff = (reloaded(**probe).logits.float() - expected).abs().max().item()
        loaded_dtype = reloaded.dtype
        del reloaded
        if loaded_dtype != dtype or not diff <= atol:  # `not <=` also catches NaN
            raise MergedExportError(
                f"The merged model would differ from the verified adapter: transformers loads it as {loaded_dtype} "
                f"(exported {dtype}) with logits {diff:.3g} away from base + adapter's (atol {atol:g}); nothing "
                f"was written to {target}. A 16-bit base or export.dtype rounds every weight: accept it with "
                f"verify.atol, or export float32.")
        files = [p for p in staging.rglob("*") if p.is_file()]
        size, shards = sum(p.stat().st_size for p in files), sum(p.suffix == ".safetensors" for p in files)
    return {"path": str(target), "bytes": size, "shards": shards, "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff": diff, "atol": atol}
