"""export_merged_model: the merged folder loads in transformers with the logits of base + adapter, sharded as
asked, with the tokenizer; a merged model that differs is never written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterflow import AdapterModel, LoraConfig, get_adapter_model
from adapterflow.runtime.base_models import load_base_model, resolve_base_model
from adapterflow.runtime.merged_export import FP32_ATOL, MergedExportError, export_merged_model
from tiny import randomize_adapters

CONFIGS = {
    "lora_all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "modules_to_save_bias": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                 bias="all"),
    "pissa_unconverted": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights="pissa"),
}


@pytest.fixture(scope="module")
def builtin_base():
    return resolve_base_model("builtin:tiny-llama")


@pytest.fixture(scope="module")
def probe():
    ids = torch.randint(7, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def saved(base_path, folder, **config):
    model = get_adapter_model(load_base_model(base_path), LoraConfig(task_type="CAUSAL_LM", **config))
    randomize_adapters(model)
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def adapter_logits(base_path, adapter_dir, probe, dtype=torch.float32):
    return AdapterModel.from_pretrained(load_base_model(base_path, dtype=dtype), adapter_dir)(**probe).logits.float()


@pytest.mark.parametrize("case", CONFIGS)
def test_merged_folder_loads_with_the_logits_of_base_plus_adapter(case, builtin_base, probe, tmp_path):
    adapter = saved(builtin_base, tmp_path / "adapter", **CONFIGS[case])
    result = export_merged_model(builtin_base, adapter, tmp_path / "merged", probe, base_dtype=torch.float32,
                                 atol=FP32_ATOL, max_shard_size="500KB", card="# merged\n")
    folder = tmp_path / "merged"
    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert result["shards"] == len(shards) >= 3 and "model.safetensors.index.json" in names  # 1.9 MB in 500 KB shards
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(names)
    assert result["bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    assert result["path"] == str(folder) and result["dtype"] == "float32" and result["max_abs_diff"] <= FP32_ATOL
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = reloaded(**probe).logits.float()
    torch.testing.assert_close(logits, adapter_logits(builtin_base, adapter, probe), atol=FP32_ATOL, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer("Repeat: red map").input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("dtype, within", [(torch.bfloat16, 0.2), (torch.float16, 5e-2)])
def test_a_16_bit_export_is_compared_with_base_plus_adapter_in_that_dtype(dtype, within, builtin_base, probe, tmp_path):
    """bfloat16 rounds the merged weights enough to move logits by ~0.07 here (the pre-training check asks for
    verify.atol); float16 stays within the default 5e-2."""
    adapter = saved(builtin_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    result = export_merged_model(builtin_base, adapter, tmp_path / "merged", probe, base_dtype=torch.float32,
                                 dtype=dtype, atol=within)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    assert config["dtype"] == name and result["dtype"] == name and result["shards"] == 1
    assert 0 < result["max_abs_diff"] <= within
    print(f"{name} export of an fp32 run: max |logit difference| {result['max_abs_diff']:.3g}")


def test_a_merged_model_that_differs_is_never_written(builtin_base, probe, tmp_path):
    adapter = saved(builtin_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    target = tmp_path / "merged"
    target.mkdir()
    (target / "previous.txt").write_text("an earlier export")
    with pytest.raises(MergedExportError, match=r"differ from the verified adapter.*atol 1e-05.*nothing was written"):
        export_merged_model(builtin_base, adapter, target, probe, base_dtype=torch.float32, dtype=torch.bfloat16,
                            atol=FP32_ATOL)  # bf16 rounding is far above the fp32 tolerance
    assert [p.name for p in target.iterdir()] == ["previous.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not MergedExportError("x").transient  # a user-visible verdict: never retried


def test_the_merged_model_is_freed_before_the_folder_is_reloaded(builtin_base, probe, tmp_path, monkeypatch):
    """The export's peak memory is one model: the base holding the merged weights is gone (no reference left)
    when transformers loads the written folder back for the check."""
    import gc
    import weakref

    from adapterflow.runtime import merged_export

    adapter = saved(builtin_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    loaded, alive_at_reload = [], []
    real_load, real_from_pretrained = merged_export.load_base_model, AutoModelForCausalLM.from_pretrained

    def tracked_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def checking_from_pretrained(*args, **kwargs):
        gc.collect()
        alive_at_reload.append([ref() is not None for ref in loaded])
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(merged_export, "load_base_model", tracked_load)
    monkeypatch.setattr(merged_export.AutoModelForCausalLM, "from_pretrained", checking_from_pretrained)
    result = export_merged_model(builtin_base, adapter, tmp_path / "merged", probe, base_dtype=torch.float32,
                                 atol=FP32_ATOL)
    # the first call is load_base_model's own; the last one is the check's reload of the written folder
    assert alive_at_reload[-1] == [False] and result["max_abs_diff"] <= FP32_ATOL
