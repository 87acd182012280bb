"""The published model card (the output folder's README.md, also the Hub card and an MLflow model file) names the
base model as the user named it: `builtin:NAME`, a Hub id, or a local folder's name, never a machine-local path
such as the builtin model's cache folder; `base_model` metadata only for a Hub id."""

import yaml

from adapterflow import LoraConfig
from adapterflow.model_card import ModelCardInfo, base_model_label, conversion_note, render_model_card

CACHE_PATH = "/root/.cache/adapterflow/tiny-llama-0123abcd"


def card(base_model: str, configured: str = CACHE_PATH, **info) -> tuple[dict, str]:
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        base_model_name_or_path=configured)
    text = render_model_card({"default": config}, info=ModelCardInfo(base_model=base_model, **info))
    return yaml.safe_load(text.split("---\n")[1]), text


def test_builtin_base_is_named_as_given_never_by_its_cache_folder():
    meta, text = card("builtin:tiny-llama")
    assert "base_model" not in meta and not any("base_model" in tag for tag in meta["tags"])
    assert "# LoRA adapter for builtin:tiny-llama\n" in text
    assert "adapterflow's builtin base model `builtin:tiny-llama`" in text
    assert 'from_pretrained(resolve_base_model("builtin:tiny-llama"))' in text
    assert CACHE_PATH not in text and ".cache" not in text


def test_hub_base_is_the_title_and_the_metadata():
    meta, text = card("Qwen/Qwen2.5-0.5B", configured="Qwen/Qwen2.5-0.5B")
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and "base_model:adapter:Qwen/Qwen2.5-0.5B" in meta["tags"]
    assert "# LoRA adapter for Qwen/Qwen2.5-0.5B\n" in text and 'from_pretrained("Qwen/Qwen2.5-0.5B")' in text


def test_local_folder_is_named_by_its_folder_name():
    for given in ("/models/Qwen2.5-0.5B-Instruct", "./models/Qwen2.5-0.5B-Instruct/", "~/Qwen2.5-0.5B-Instruct"):
        meta, text = card(given, configured="/abs/models/Qwen2.5-0.5B-Instruct")
        assert "base_model" not in meta, given
        assert "# LoRA adapter for Qwen2.5-0.5B-Instruct\n" in text, given
        assert "the local base model `Qwen2.5-0.5B-Instruct` (not a Hub repo)" in text
        assert "/models" not in text and "/abs/" not in text, given


def test_label_rule():
    assert [base_model_label(b) for b in ("builtin:tiny-llama", "org/name", "/a/b/c", "rel/dir/", None)] == \
        ["builtin:tiny-llama", "org/name", "c", "dir", None]


def test_a_converted_pissa_card_explains_the_rank():
    _, text = card("builtin:tiny-llama", notes=[conversion_note(8, 16)])
    assert "Trained as PiSSA r=8; saved as LoRA r=16 (PiSSA->LoRA conversion doubles the rank)" in text
    assert "| default | 16 | 32 | q_proj, v_proj | True |" in text


def test_the_merged_model_card_is_a_transformers_card():
    from adapterflow.model_card import render_merged_model_card

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    text = render_merged_model_card({"default": config}, ModelCardInfo(
        license="apache-2.0", tags=("demo",), repo_id="me/qwen-merged", training={"steps": 300, "final_loss": 0.5}))
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == {"base_model": "Qwen/Qwen2.5-0.5B", "base_model_relation": "finetune", "license": "apache-2.0",
                    "pipeline_tag": "text-generation", "library_name": "transformers",
                    "tags": ["adapterflow", "lora", "merged-lora", "demo"]}
    assert "# Qwen/Qwen2.5-0.5B with a merged LoRA adapter\n" in text and "peft" not in text.split("---\n")[1]
    assert 'AutoModelForCausalLM.from_pretrained("me/qwen-merged")' in text and "PeftModel" not in text
    assert "| default | 16 | 32 | q_proj, v_proj | True |" in text and "| steps | 300 |" in text
    builtin = render_merged_model_card({"default": config}, ModelCardInfo(base_model="builtin:tiny-llama"))
    assert "base_model" not in yaml.safe_load(builtin.split("---\n")[1])
    assert "adapterflow's builtin base model `builtin:tiny-llama`" in builtin and "<this folder or repo>" in builtin
