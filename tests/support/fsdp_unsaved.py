"""Run on 2 ranks under torchrun: an AdapterModel sharded by FSDP2 tries to save without gathering its tensors
(the failure accelerate fixed in its PR #4206), then saves after Parallel.full_adapter_state gathered them.

    torchrun --nproc-per-node 2 fsdp_unsaved.py <base model folder> <output folder>

Each rank writes <output>/result-<rank>.json: the error message of each refused attempt, whether it left a folder,
and whether the gathered state equals the unsharded model's."""

import json
import sys
from pathlib import Path

import torch

import tiny
from adapterflow import LoraConfig, get_adapter_model, get_adapter_state_dict, write_adapters
from adapterflow.runtime.distributed import Parallel
from adapterflow.state_dict import AdapterSaveError, check_saveable

base_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
parallel = Parallel.from_environment("fsdp", "cpu")
torch.manual_seed(0)
model = get_adapter_model(tiny.load_llama(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
tiny.randomize_adapters(model)
config = model.peft_config["default"]
unsharded = {k: v.clone() for k, v in get_adapter_state_dict(model, config).items()}
parallel.wrap(model)
results = {}


def attempt(name, save):
    target = out / f"{name}-rank{parallel.rank}"
    try:
        save(target)
        results[name] = "saved"
    except AdapterSaveError as exc:
        results[name] = str(exc)
    results[f"{name}_wrote"] = target.exists()


def local_shards(keep=lambda key: True):
    return {k: v.to_local() for k, v in get_adapter_state_dict(model, config).items() if keep(k)}


attempt("save_pretrained", lambda target: model.save_pretrained(target))
attempt("local_shards", lambda target: write_adapters(target, {"default": (local_shards(), config)}))
attempt("lora_B_shards", lambda target: check_saveable(local_shards(lambda k: "lora_B" in k), config, model))
full = parallel.full_adapter_state(model, config, "default", False)
results["gathered_equal"] = full.keys() == unsharded.keys() and all(torch.equal(full[k], unsharded[k]) for k in full)
if parallel.is_main_process:
    write_adapters(out / "gathered", {"default": (full, config)})
(out / f"result-{parallel.rank}.json").write_text(json.dumps(results))
parallel.close()
