"""PiSSA initialisation and PiSSA -> LoRA conversion."""

import json
import math
import shutil
import warnings

import pytest
import torch

from adapterflow import AdapterModel, LoraConfig, get_adapter_model
import tiny
from tiny import load_llama, logits, randomize_adapters

PISSA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM")


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def trained_pissa(load_base, tmp_path, init="pissa", **overrides):
    """A PiSSA model, its initial adapter saved under tmp_path/initial, then 'trained' (randomised)."""
    model = get_adapter_model(load_base(), LoraConfig(init_lora_weights=init, **{**PISSA, **overrides}))
    model.save_pretrained(tmp_path / "initial")
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_init_leaves_outputs_unchanged(init, load_base, input_ids):
    base = load_base()
    expected = logits(base, input_ids)
    model = get_adapter_model(base, LoraConfig(init_lora_weights=init, **PISSA))
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # unlike default init, B is not zero
    assert not torch.equal(layer.base_layer.weight, load_base().model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pissa_on_half_precision_keeps_dtypes(dtype, base_dir, input_ids):
    base = load_llama(base_dir, dtype=dtype)
    expected = logits(base, input_ids)
    model = get_adapter_model(base, LoraConfig(init_lora_weights="pissa", **PISSA))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == dtype  # residual cast back
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters kept in fp32, as PEFT does
    torch.testing.assert_close(logits(model, input_ids), expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"target_modules": ["embed_tokens", "q_proj"]},
                                   {"modules_to_save": ["lm_head"]}, {"rank_pattern": {"gate_proj": 2}}])
def test_converted_adapter_on_original_base_reproduces_trained_model(extra, load_base, input_ids, tmp_path):
    model = trained_pissa(load_base, tmp_path, **extra)
    initial_before = snapshot(tmp_path / "initial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embed_tokens: "Setting save_embedding_layers to True"
        model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    reloaded = AdapterModel.from_pretrained(load_base(), tmp_path / "converted")
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    expected_alpha = 8 * math.sqrt(2) if extra.get("use_rslora") else 16
    assert config["lora_alpha"] == pytest.approx(expected_alpha)
    assert config["rank_pattern"] == {k: 2 * v for k, v in extra.get("rank_pattern", {}).items()}
    # Unlike PEFT, the initial adapter is only read: it stays a valid PiSSA initial adapter, byte for byte.
    assert snapshot(tmp_path / "initial") == initial_before


def test_conversion_works_for_bin_and_initial_folder_named_default(load_base, input_ids, tmp_path):
    """PEFT deletes the user's trained adapter when the initial folder is called like an adapter ('default')."""
    model = get_adapter_model(load_base(), LoraConfig(init_lora_weights="pissa", **PISSA))
    model.save_pretrained(tmp_path / "default")
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "out", safe_serialization=False,
                          path_initial_model_for_weight_conversion=str(tmp_path / "default") + "/")
    assert model.peft_config["default"].init_lora_weights == "pissa"  # the live model is untouched
    reloaded = AdapterModel.from_pretrained(load_base(), tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)


def test_save_with_conversion_leaves_rng_untouched(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path, init="pissa_niter_2")
    before = torch.get_rng_state()
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert torch.equal(torch.get_rng_state(), before)


def test_convert_pissa_to_lora_is_a_deprecated_alias(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path)
    with pytest.warns(FutureWarning, match="path_initial_model_for_weight_conversion"):
        model.save_pretrained(tmp_path / "converted", convert_pissa_to_lora=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8


def test_saving_randomized_pissa_unconverted_warns_once_trained(load_base, tmp_path):
    model = get_adapter_model(load_base(), LoraConfig(init_lora_weights="pissa_niter_2", **PISSA))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the initial adapter, saved as the README says: nothing to warn about
        model.save_pretrained(tmp_path / "initial")
    randomize_adapters(model)  # "training"
    with pytest.warns(UserWarning, match="randomized SVD.*path_initial_model_for_weight_conversion"):
        model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.warns(UserWarning, match="randomized SVD runs again"):
        AdapterModel.from_pretrained(load_base(), tmp_path / "out")


def assert_refused(model, tmp_path, match, **save_kwargs):
    """The save raises with `match` and writes nothing: no output folder, initial adapter byte-identical."""
    initial_before = snapshot(tmp_path / "initial") if (tmp_path / "initial").exists() else None
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        model.save_pretrained(tmp_path / "out", **save_kwargs)
    assert not (tmp_path / "out").exists()
    if initial_before is not None:
        assert snapshot(tmp_path / "initial") == initial_before


def test_missing_initial_adapter_is_refused(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path)
    assert_refused(model, tmp_path, "No initial adapter at .*nope.*before training",
                   path_initial_model_for_weight_conversion=tmp_path / "nope")


def test_initial_adapter_with_other_targets_is_refused(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path)
    other = get_adapter_model(load_base(), LoraConfig(init_lora_weights="pissa", **{**PISSA, "target_modules": ["q_proj", "k_proj"]}))
    shutil.rmtree(tmp_path / "initial")
    other.save_pretrained(tmp_path / "initial")
    assert_refused(model, tmp_path, r"different modules .*only in the trained adapter: .*gate_proj.*only in the initial adapter: .*k_proj",
                   path_initial_model_for_weight_conversion=tmp_path / "initial")


def test_initial_adapter_with_other_rank_is_refused(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path)
    other = get_adapter_model(load_base(), LoraConfig(init_lora_weights="pissa", **{**PISSA, "r": 2}))
    shutil.rmtree(tmp_path / "initial")
    other.save_pretrained(tmp_path / "initial")
    assert_refused(model, tmp_path, r"ranks differ: trained r=4.*initial r=2(.|\n)*shapes differ",
                   path_initial_model_for_weight_conversion=tmp_path / "initial")


def test_rslora_with_patterns_is_refused(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path, use_rslora=True, alpha_pattern={"q_proj": 4})
    assert_refused(model, tmp_path, "use_rslora together with rank_pattern/alpha_pattern",
                   path_initial_model_for_weight_conversion=tmp_path / "initial")


def test_pissa_rewritten_output_head_saved_as_embedding_is_refused(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path, target_modules=["q_proj", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_refused(model, tmp_path, r"base weights of .*lm_head.*save_embedding_layers=False",
                       path_initial_model_for_weight_conversion=tmp_path / "initial")
    model.save_pretrained(tmp_path / "out", save_embedding_layers=False,
                          path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_conversion_of_several_adapters_at_once_is_refused(load_base, tmp_path):
    model = trained_pissa(load_base, tmp_path)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    assert_refused(model, tmp_path, r"converts one adapter.*selected_adapters",
                   path_initial_model_for_weight_conversion=tmp_path / "initial")


def test_pissa_on_tied_weights_is_refused(tied_base_dir):
    with pytest.raises(ValueError, match=r"lm_head: its weight is shared with .*embed_tokens.*tie_word_embeddings=False"):
        get_adapter_model(load_llama(tied_base_dir), LoraConfig(init_lora_weights="pissa", target_modules=["lm_head"]))


@pytest.mark.parametrize("init", ["pissa_niter_2", "pissa"])
def test_initial_adapter_restores_the_exact_residual(init, load_base, input_ids, tmp_path):
    """Resuming needs the model as it was after init: the saved factors give the residual bit for bit, where
    running the randomized SVD again would not."""
    torch.manual_seed(3)
    model = get_adapter_model(load_base(), LoraConfig(init_lora_weights=init, **{**PISSA, "target_modules": ["q_proj", "embed_tokens"]}))
    model.save_pretrained(tmp_path / "initial")
    restored = AdapterModel.from_initial_adapter(load_base(), tmp_path / "initial")
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(ours, theirs), name
    assert any(p.requires_grad for p in restored.parameters())
    torch.testing.assert_close(logits(restored, input_ids), logits(model, input_ids), atol=0, rtol=0)


def test_plain_lora_initial_is_refused_where_peft_writes_a_wrong_adapter(load_base, input_ids, tmp_path):
    """Same shapes, plain LoRA init: PEFT converts without a word and its adapter is off; we refuse."""
    import peft

    def peft_model(init):
        return peft.get_peft_model(load_base(), peft.LoraConfig(init_lora_weights=init, **{**PISSA, "task_type": None}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft_model("pissa")
        randomize_adapters(trained)
        peft_model(True).save_pretrained(tmp_path / "lora_initial")
        trained.save_pretrained(tmp_path / "peft_out", path_initial_model_for_weight_conversion=str(tmp_path / "lora_initial"))
        wrong = peft.PeftModel.from_pretrained(load_base(), tmp_path / "peft_out")
    assert (logits(wrong, input_ids) - logits(trained, input_ids)).abs().max() > 1e-2  # the hazard
    ours = trained_pissa(load_base, tmp_path)
    shutil.rmtree(tmp_path / "initial")
    get_adapter_model(load_base(), LoraConfig(**{**PISSA, "init_lora_weights": True})).save_pretrained(tmp_path / "initial")
    assert_refused(ours, tmp_path, r"not the PiSSA initialisation .*A0 @ A0.T != B0.T @ B0",
                   path_initial_model_for_weight_conversion=tmp_path / "initial")


def test_conversion_against_an_initial_folder_rewritten_by_peft_still_works(load_base, input_ids, tmp_path):
    """PEFT (and adapterflow before) rewrote the initial adapter's config to init_lora_weights=true on conversion;
    such a folder still converts, as often as asked, each time reproducing the trained model."""
    model = trained_pissa(load_base, tmp_path)
    config = json.loads((tmp_path / "initial" / "adapter_config.json").read_text())
    (tmp_path / "initial" / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
    for attempt in ("first", "second"):
        model.save_pretrained(tmp_path / attempt, path_initial_model_for_weight_conversion=tmp_path / "initial")
        reloaded = AdapterModel.from_pretrained(load_base(), tmp_path / attempt)
        torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, init", [(torch.bfloat16, "pissa"), (torch.float16, "pissa_niter_2"),
                                         (torch.float32, "pissa_niter_4")])
def test_the_initial_adapter_check_accepts_half_precision_and_randomized_pissa(dtype, init, base_dir, tmp_path):
    model = get_adapter_model(load_llama(base_dir, dtype=dtype), LoraConfig(init_lora_weights=init, **PISSA))
    model.save_pretrained(tmp_path / "initial")
    randomize_adapters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8


def test_initial_adapter_problems_without_base_weights_still_check_the_factors(load_base, tmp_path):
    """The pipeline converts from files alone (no live residual): the factor checks still run."""
    from adapterflow.conversion import initial_adapter_problems
    from adapterflow.save import read_adapter

    get_adapter_model(load_base(), LoraConfig(init_lora_weights="pissa", **PISSA)).save_pretrained(tmp_path / "pissa")
    get_adapter_model(load_base(), LoraConfig(**{**PISSA, "init_lora_weights": True})).save_pretrained(tmp_path / "lora")
    assert initial_adapter_problems(*read_adapter(tmp_path / "pissa"), {}) == []
    assert "A0 @ A0.T != B0.T @ B0" in initial_adapter_problems(*read_adapter(tmp_path / "lora"), {})[0]


@pytest.mark.parametrize("other", ["another base", "another randomized run"])
def test_initial_adapter_of_another_base_or_run_is_refused(other, base_dir, tmp_path):
    """Same shapes, same config, PiSSA factors, but not this model's: the residual check (4 columns and 4 rows of
    each base weight) tells them apart, and nothing is written."""
    init = "pissa" if other == "another base" else "pissa_niter_2"
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    torch.manual_seed(0)
    model = get_adapter_model(tiny.load_llama(base_dir), LoraConfig(**config))
    other_base = tiny.save_tiny_llama(tmp_path / "other", seed=1) if other == "another base" else base_dir
    torch.manual_seed(1)
    get_adapter_model(tiny.load_llama(other_base), LoraConfig(**config)).save_pretrained(tmp_path / "initial")
    initial_before = {p.name: p.read_bytes() for p in (tmp_path / "initial").iterdir()}
    with pytest.raises(ValueError, match="not the PiSSA initialisation of this model's base"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "initial").iterdir()} == initial_before
