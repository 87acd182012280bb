"""The integrity manifest adapterflow.json: written by every save from the bytes written, checked by every load,
ignored by PEFT; a folder without one (PEFT's) loads as before."""

import hashlib
import json
import shutil
import warnings

import pytest
import torch
from peft import PeftModel
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from adapterflow import AdapterLoadError, AdapterModel, LoraConfig, get_adapter_model, write_adapters
from adapterflow.base_fingerprint import base_fingerprint, canonical_json
from adapterflow.manifest import ManifestError, read_manifest, rewrite_file, verify_manifest
from adapterflow.layers import AdapterLayer
from tiny import logits, randomize_adapters, save_tiny_llama

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture
def model(load_base):
    model = get_adapter_model(load_base(), LoraConfig(**CONFIG))
    randomize_adapters(model)
    return model


def digests(folder, names):
    return {name: {"sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
                   "size": (folder / name).stat().st_size} for name in names}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_a_save_writes_the_digests_of_its_files_and_the_base_fingerprint(model, tmp_path, safe):
    written = model.save_pretrained(tmp_path / "a", safe_serialization=safe)
    folder = tmp_path / "a"
    assert written[-1] == folder / "adapterflow.json"
    manifest = json.loads((folder / "adapterflow.json").read_text())
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert manifest["format_version"] == 1 and manifest["created_by"].startswith("adapterflow ")
    assert manifest["files"] == digests(folder, ["README.md", "adapter_config.json", weights])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert manifest["adapter_config_sha256"] == hashlib.sha256(canonical_json(config)).hexdigest()
    base = manifest["base"]
    assert {k: base[k] for k in ("architecture", "model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                 "targeted_modules", "hub_commit")} == {
        "architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
        "vocab_size": 128, "targeted_modules": 6, "hub_commit": None}
    shapes = {f"model.layers.{i}.{m}": s for i in range(2)
              for m, s in (("self_attn.q_proj", [32, 32]), ("self_attn.v_proj", [16, 32]), ("mlp.down_proj", [32, 64]))}
    assert base["target_shapes_sha256"] == hashlib.sha256(canonical_json(shapes)).hexdigest()
    assert verify_manifest(folder) == []


def test_the_fingerprint_is_the_same_from_the_live_model_the_plain_base_and_the_meta_model(model, load_base, base_dir):
    from adapterflow.runtime.base_models import meta_base_model

    keys = model.state_dict().keys()  # any key naming the modules works; model keys hold the same paths
    state_keys = [k.replace(".default", "") for k in keys if "lora_" in k]
    live = base_fingerprint(model, state_keys)
    assert live == base_fingerprint(load_base(), state_keys) == base_fingerprint(meta_base_model(base_dir), state_keys)
    snapshot = "/cache/hub/models--org--name/snapshots/" + "a" * 40
    assert base_fingerprint(meta_base_model(base_dir), state_keys, hub_commit="b" * 40)["hub_commit"] == "b" * 40
    base = load_base()
    base.config._name_or_path = snapshot
    assert base_fingerprint(base, state_keys)["hub_commit"] == "a" * 40


def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(model, load_base, input_ids, tmp_path):
    folder = tmp_path / "a"
    model.save_pretrained(folder)
    model.save_pretrained(tmp_path / "intact")
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor: safetensors itself cannot notice
    weights.write_bytes(bytes(data))
    base = load_base()
    with pytest.raises(ManifestError, match=r"adapter_model.safetensors: sha256 .* differs .*\n.*verify_manifest=False"):
        AdapterModel.from_pretrained(base, folder)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())  # the model is untouched
    assert isinstance(ManifestError("x"), AdapterLoadError) and isinstance(ManifestError("x"), ValueError)
    with pytest.raises(ManifestError, match="adapter_model.safetensors"):
        AdapterModel.from_pretrained(load_base(), model_id_or_path=tmp_path, subfolder="a")
    intact = AdapterModel.from_pretrained(load_base(), tmp_path / "intact")
    with pytest.raises(ManifestError, match="adapter_model.safetensors"):
        intact.load_adapter(folder, "again")
    assert list(intact.peft_config) == ["default"]
    problems = verify_manifest(folder)
    assert len(problems) == 1 and "adapter_model.safetensors" in problems[0]
    loaded = AdapterModel.from_pretrained(load_base(), folder, verify_manifest=False)  # the escape hatch
    assert not torch.equal(logits(loaded, input_ids), logits(load_base(), input_ids))


def test_an_edited_config_and_a_swapped_weights_format_are_named(model, load_base, tmp_path):
    folder = tmp_path / "a"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}, indent=2))
    with pytest.raises(ManifestError, match="adapter_config.json: sha256 .* differs"):
        AdapterModel.from_pretrained(load_base(), folder)
    model.save_pretrained(folder)
    state = AdapterModel.from_pretrained(load_base(), folder).state_dict()
    (folder / "adapter_model.safetensors").unlink()
    torch.save({k: v for k, v in state.items()}, folder / "adapter_model.bin")
    with pytest.raises(ManifestError) as info:
        AdapterModel.from_pretrained(load_base(), folder)
    assert "adapter_model.bin is not listed in its adapterflow.json" in str(info.value)
    assert "adapter_model.safetensors is missing" in str(info.value)


def test_a_different_base_is_refused_naming_the_field(model, load_base, tmp_path):
    folder = tmp_path / "a"
    model.save_pretrained(folder)
    wider = save_tiny_llama(tmp_path / "wider", hidden_size=48)
    with pytest.raises(ManifestError, match=r"another base model.*\n  - hidden_size: the adapter was saved for 32, "
                                            r"this model has 48(.|\n)*verify_manifest=False"):
        AdapterModel.from_pretrained(load_base(wider), folder)
    with pytest.raises(AdapterLoadError, match="shape mismatch"):  # without the manifest: the loader's own check
        AdapterModel.from_pretrained(load_base(wider), folder, verify_manifest=False)
    # Same config sizes, other weight shapes in a targeted module: named by the shapes' digest.
    other_mlp = save_tiny_llama(tmp_path / "other-mlp", intermediate_size=48)
    with pytest.raises(ManifestError, match=r"target_shapes_sha256 \(module path -> base weight shape"):
        AdapterModel.from_pretrained(load_base(other_mlp), folder)
    deeper = get_adapter_model(load_base(save_tiny_llama(tmp_path / "deeper", num_hidden_layers=3)),
                               LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ManifestError, match="num_hidden_layers: the adapter was saved for 2, this model has 3"):
        deeper.load_adapter(folder, "again")
    assert list(deeper.peft_config) == ["default"]


def test_another_hub_commit_of_the_base_only_warns(model, load_base, tmp_path, input_ids):
    folder = tmp_path / "a"
    model.save_pretrained(folder, base_hub_commit="1" * 40)
    assert read_manifest(folder)["base"]["hub_commit"] == "1" * 40
    base = load_base()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdapterModel.from_pretrained(base, folder)  # commit unknown on this side: nothing to compare
    base = load_base()
    base.config._name_or_path = "/hub/models--org--base/snapshots/" + "2" * 40
    with pytest.warns(UserWarning, match=r"hub_commit: the adapter was saved for '1{40}', this model has '2{40}'"):
        loaded = AdapterModel.from_pretrained(base, folder)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))


def test_a_peft_folder_without_manifest_loads_as_before(load_base, input_ids, tmp_path):
    peft_model = get_peft_model(load_base(), PeftLoraConfig(**CONFIG))
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapterflow.json").exists() and verify_manifest(tmp_path / "peft") == []
    ours = AdapterModel.from_pretrained(load_base(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, input_ids), logits(peft_model, input_ids), atol=1e-5, rtol=0)


def test_peft_loads_a_folder_with_the_manifest_identically(model, load_base, input_ids, tmp_path):
    model.save_pretrained(tmp_path / "with")
    shutil.copytree(tmp_path / "with", tmp_path / "without")
    (tmp_path / "without" / "adapterflow.json").unlink()
    with_manifest = PeftModel.from_pretrained(load_base(), tmp_path / "with")
    without = PeftModel.from_pretrained(load_base(), tmp_path / "without")
    assert torch.equal(logits(with_manifest, input_ids), logits(without, input_ids))
    torch.testing.assert_close(logits(with_manifest, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)


def test_the_conversion_save_describes_the_converted_files(load_base, input_ids, tmp_path):
    model = get_adapter_model(load_base(), LoraConfig(**{**CONFIG, "init_lora_weights": "pissa"}))
    model.save_pretrained(tmp_path / "initial")
    initial_files = {p.name: p.read_bytes() for p in (tmp_path / "initial").iterdir()}
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    folder = tmp_path / "converted"
    manifest = read_manifest(folder)
    assert manifest["files"] == digests(folder, FILES)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8  # 2r: the converted adapter
    assert verify_manifest(folder) == [] and manifest["base"]["targeted_modules"] == 6
    assert {p.name: p.read_bytes() for p in (tmp_path / "initial").iterdir()} == initial_files
    loaded = AdapterModel.from_pretrained(load_base(), folder)  # the original base: its fingerprint matches
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), atol=1e-4, rtol=0)


def test_saving_only_another_adapter_keeps_the_root_manifest_right(model, load_base, tmp_path):
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    folder = tmp_path / "a"
    model.save_pretrained(folder)
    model.save_pretrained(folder, selected_adapters=["other"])  # rewrites README.md and other/, keeps default
    assert verify_manifest(folder) == []
    assert read_manifest(folder)["files"] == digests(folder, FILES)
    assert read_manifest(folder / "other")["base"]["targeted_modules"] == 2
    fresh = tmp_path / "only-other"
    model.save_pretrained(fresh, selected_adapters=["other"])  # a root with only the card: no root manifest
    assert not (fresh / "adapterflow.json").exists() and verify_manifest(fresh) == []
    AdapterModel.from_pretrained(load_base(), fresh, subfolder="other")


def test_verify_manifest_and_rewrite_file(model, load_base, tmp_path):
    folder = tmp_path / "a"
    model.save_pretrained(folder)
    (folder / "README.md").write_text("edited card\n")
    (folder / "notes.txt").write_text("the user's own file: not an adapter file, not checked")
    assert verify_manifest(folder) == [f"{folder / 'README.md'} has 12 bytes, its adapterflow.json says "
                                       f"{read_manifest(folder)['files']['README.md']['size']}"]
    AdapterModel.from_pretrained(load_base(), folder)  # the card does not change the loaded model
    rewrite_file(folder, "README.md", b"a new card\n")
    assert verify_manifest(folder) == [] and (folder / "README.md").read_bytes() == b"a new card\n"
    (folder / "adapterflow.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not an adapterflow manifest"):
        verify_manifest(folder)
    with pytest.raises(ManifestError, match="verify_manifest=False"):
        AdapterModel.from_pretrained(load_base(), folder)
    AdapterModel.from_pretrained(load_base(), folder, verify_manifest=False)


def test_write_adapters_without_a_base_model_leaves_the_base_unknown(tmp_path, load_base):
    state = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.zeros(shape)
             for i in range(2) for ab, shape in (("A", (2, 32)), ("B", (32, 2)))}
    write_adapters(tmp_path / "a", {"default": (state, LoraConfig(r=2, target_modules=["q_proj"]))})
    assert read_manifest(tmp_path / "a")["base"] is None and verify_manifest(tmp_path / "a") == []
    AdapterModel.from_pretrained(load_base(), tmp_path / "a")  # files checked, no base to compare


def test_large_tensors_are_hashed_in_the_helper_thread_in_file_order(tmp_path, monkeypatch):
    import os
    import threading

    from adapterflow import digest

    # Tensors over the helper thread's threshold, mixed with small ones: the digest must follow the file's order.
    generator = torch.Generator().manual_seed(0)
    state = {f"base_model.model.m{i}.q_proj.lora_{ab}.weight": torch.randn(shape, generator=generator)
             for i, (r, n) in enumerate([(8, 4096), (2, 16), (16, 2048)])
             for ab, shape in (("A", (r, n)), ("B", (n, r)))}
    config = LoraConfig(r=16, target_modules=["q_proj"], rank_pattern={"m0.q_proj": 8, "m1.q_proj": 2})
    started = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), real_start(self))[1])
    write_adapters(tmp_path / "a", {"default": (state, config)})
    assert "adapterflow-sha256" in started
    assert read_manifest(tmp_path / "a")["files"]["adapter_model.safetensors"] == digests(
        tmp_path / "a", ["adapter_model.safetensors"])["adapter_model.safetensors"]
    assert digest._THREAD_MIN_BYTES < 8 * 4096 * 4

    # A write that fails half way stops the helper thread and leaves no manifest.
    calls = {"n": 0}
    real_writev = os.writev

    def failing_writev(fd, buffers):
        calls["n"] += 1
        if calls["n"] == 1:  # the file is one writev group: its buffers are already queued for hashing
            raise OSError(5, "Input/output error (injected)")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", failing_writev)
    before = threading.active_count()
    with pytest.raises(OSError, match="injected"):
        write_adapters(tmp_path / "b", {"default": (state, config)})
    assert threading.active_count() == before and not (tmp_path / "b").exists()


def test_a_reindented_config_loads_and_a_peft_save_into_the_folder_is_told_how_to_fix(model, load_base, tmp_path):
    folder = tmp_path / "a"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))
    AdapterModel.from_pretrained(load_base(), folder)  # the same settings: the same adapter
    assert len(verify_manifest(folder)) == 1 and "adapter_config.json has" in verify_manifest(folder)[0]
    peft_model = PeftModel.from_pretrained(load_base(), folder, is_trainable=True)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)
    peft_model.save_pretrained(folder)  # PEFT rewrites the config and weights, and leaves adapterflow.json
    with pytest.raises(ManifestError) as info:
        AdapterModel.from_pretrained(load_base(), folder)
    assert "PEFT's save_pretrained" in str(info.value) and f"delete {folder / 'adapterflow.json'}" in str(info.value)
    (folder / "adapterflow.json").unlink()
    AdapterModel.from_pretrained(load_base(), folder)


def test_verify_manifest_refuses_a_missing_folder_and_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is missing; pass a saved adapter folder"):
        verify_manifest(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        verify_manifest(tmp_path / "file.txt")
