"""Bad input to the library, as a new user would give it: every case raises our (or the OS's, re-worded) error type,
the message names the parameter or file at fault, and the disk is byte-identical afterwards (the whole test
folder is hashed before and after)."""

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterflow import (AdapterLoadError, AdapterModel, ConfigError, ConversionError, LoraConfig, TargetError,
                         get_adapter_model)
from tiny import load_llama, randomize_adapters

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
PISSA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
# Bytes of the LORA adapter on the tiny Llama: 2 layers x (q_proj: A 4x32 + B 32x4, v_proj: A 4x32 + B 16x4) x fp32.
LORA_BYTES = f"{2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) * 4:,d}"


def tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Env:
    """What a case works with; every folder is created lazily under tmp, before the action runs."""

    def __init__(self, tmp: Path, load_base, monkeypatch, tied_base_dir):
        self.tmp, self.load_base, self.monkeypatch, self.tied_base_dir = tmp, load_base, monkeypatch, tied_base_dir

    def model(self, **overrides):
        model = get_adapter_model(self.load_base(), LoraConfig(**{**LORA, **overrides}))
        randomize_adapters(model)
        return model

    def saved(self, name="adapter", safe=True):
        folder = self.tmp / name
        if not folder.exists():
            self.model().save_pretrained(folder, safe_serialization=safe)
            # The load cases edit files by hand to reach the loader's own checks (as in a folder PEFT wrote):
            # without the manifest, which refuses every edited file first (tests/core/test_manifest.py).
            (folder / "adapterflow.json").unlink()
        return folder

    def edit_config(self, folder, text):
        (folder / "adapter_config.json").write_text(text)
        return folder

    def config_with(self, **values):
        folder = self.saved()
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(values)
        return self.edit_config(folder, json.dumps(config))

    def trained_pissa(self):
        model = get_adapter_model(self.load_base(), LoraConfig(**PISSA))
        model.save_pretrained(self.tmp / "initial")
        randomize_adapters(model)
        return model

    def initial_from(self, model):
        shutil.rmtree(self.tmp / "initial", ignore_errors=True)
        model.save_pretrained(self.tmp / "initial")

    def fail_os_call(self, name, err, only_if=lambda *a: True):
        real = getattr(os, name)

        def failing(*args, **kwargs):
            if only_if(*args):
                raise OSError(err, os.strerror(err), str(args[0]) if args and not isinstance(args[0], int) else None)
            return real(*args, **kwargs)

        self.monkeypatch.setattr(os, name, failing)


@dataclass
class Case:
    id: str
    error: type
    match: str  # must name the parameter or file
    action: Callable[[Env], Callable[[], object]]  # setup (may write), returning the call that must be refused
    not_in_message: str | None = None


def config_case(id, match, **kwargs):
    return Case(id, ConfigError, match, lambda env: lambda: LoraConfig(**kwargs))


def load_case(id, error, match, prepare, **kwargs):
    def action(env):
        folder = prepare(env)
        return lambda: AdapterModel.from_pretrained(env.load_base(), folder, **kwargs)
    return Case(id, error, match, action)


def save_case(id, error, match, target, model=lambda env: env.model(), not_in_message=None, patch=None, **kwargs):
    def action(env):
        m = model(env)
        path = target(env)
        if patch:
            patch(env)
        return lambda: m.save_pretrained(path, **kwargs)
    return Case(id, error, match, action, not_in_message)


def write_weights_file(content: bytes, name="adapter_model.safetensors"):
    def prepare(env):
        folder = env.saved()
        (folder / "adapter_model.safetensors").unlink()
        (folder / name).write_bytes(content)
        return folder
    return prepare


def truncated(env):
    folder = env.saved()
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def truncated_bin(env):
    folder = env.saved("bin", safe=False)
    data = (folder / "adapter_model.bin").read_bytes()
    (folder / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    return folder


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def drop_key(env):
    folder = env.saved()
    state = load_file(folder / "adapter_model.safetensors")
    state.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def enospc_on(name):
    return lambda env: env.fail_os_call(name, errno.ENOSPC)


def read_only_staging(env):
    # A folder that cannot be written: the first write into it fails (tests run as root, so chmod would not do).
    env.fail_os_call("mkdir", errno.EROFS, only_if=lambda path, *a: ".staging-" in str(path))


def two_adapters(env):
    model = env.trained_pissa()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    return model


def lora_initial(env):
    model = env.trained_pissa()
    env.initial_from(get_adapter_model(env.load_base(), LoraConfig(**LORA)))  # same shapes, plain LoRA init
    return model


def other_base_initial(env):
    model = env.trained_pissa()
    torch.manual_seed(7)
    other = env.load_base()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    env.initial_from(get_adapter_model(other, LoraConfig(**PISSA)))
    return model


def other_alpha_initial(env):
    model = env.trained_pissa()
    env.initial_from(get_adapter_model(env.load_base(), LoraConfig(**{**PISSA, "lora_alpha": 4})))
    return model


def gaussian_initial(env):
    model = env.trained_pissa()
    env.initial_from(get_adapter_model(env.load_base(), LoraConfig(**{**LORA, "init_lora_weights": "gaussian"})))
    return model


def conversion_case(id, error, match, model_fn, patch=None, initial="initial", **kwargs):
    def action(env):
        model = model_fn(env)
        if patch:
            patch(env)
        return lambda: model.save_pretrained(env.tmp / "out", path_initial_model_for_weight_conversion=env.tmp / initial,
                                             **kwargs)
    return Case(id, error, match, action, not_in_message=".staging-")


def add_case(id, error, match, first, second):
    def action(env):
        model = get_adapter_model(env.load_base(), LoraConfig(**first))
        return lambda: model.add_adapter("other", second() if callable(second) else LoraConfig(**second))
    return Case(id, error, match, action)


def load_second_case(id, error, match, second_config):
    def action(env):
        donor = get_adapter_model(env.load_base(), LoraConfig(**second_config))
        donor.save_pretrained(env.tmp / "second")
        model = AdapterModel.from_pretrained(env.load_base(), env.saved())
        return lambda: model.load_adapter(env.tmp / "second", "other")
    return Case(id, error, match, action)


CASES = [
    # LoraConfig values (ConfigError, the parameter named)
    config_case("alpha-nan", r"lora_alpha must be a finite number, got nan", r=4, lora_alpha=math.nan, target_modules=["q"]),
    config_case("alpha-inf", r"lora_alpha must be a finite number, got inf", r=4, lora_alpha=math.inf, target_modules=["q"]),
    config_case("alpha-string", r"lora_alpha must be a finite number, got '8'", lora_alpha="8", target_modules=["q"]),
    config_case("dropout-nan", r"lora_dropout must be in \[0, 1\), got nan", lora_dropout=math.nan, target_modules=["q"]),
    config_case("dropout-one", r"lora_dropout must be in \[0, 1\), got 1.0", lora_dropout=1.0, target_modules=["q"]),
    config_case("dropout-negative", r"lora_dropout must be in \[0, 1\)", lora_dropout=-0.1, target_modules=["q"]),
    config_case("r-zero", r"r must be a positive integer, got 0", r=0, target_modules=["q"]),
    config_case("r-float", r"r must be a positive integer, got 2.5", r=2.5, target_modules=["q"]),
    config_case("r-bool", r"r must be a positive integer, got True", r=True, target_modules=["q"]),
    config_case("bias", r"bias must be one of", bias="some", target_modules=["q"]),
    config_case("peft-type", r"peft_type 'IA3' is not supported", peft_type="IA3", target_modules=["q"]),
    config_case("task-type", r"task_type must be one of", task_type="SEQ_CLS", target_modules=["q"]),
    config_case("no-targets", r"target_modules is required"),
    config_case("empty-targets", r"target_modules must be a non-empty list", target_modules=[]),
    config_case("bad-regex", r"target_modules '\(' is not a valid regular expression", target_modules="("),
    config_case("exclude-ints", r"exclude_modules must be", target_modules=["q"], exclude_modules=[1]),
    config_case("modules-to-save-string", r"modules_to_save must be a list", target_modules=["q"], modules_to_save="lm_head"),
    config_case("init-loftq", r"init_lora_weights='loftq' is not supported", target_modules=["q"], init_lora_weights="loftq"),
    config_case("init-niter", r"init_lora_weights='pissa_niter_x'", target_modules=["q"], init_lora_weights="pissa_niter_x"),
    config_case("rank-pattern-zero", r"rank_pattern values must be positive", target_modules=["q"], rank_pattern={"q": 0}),
    config_case("alpha-pattern-nan", r"alpha_pattern values must be positive finite", target_modules=["q"],
                alpha_pattern={"q": math.nan}),
    config_case("layers-pattern-alone", r"layers_pattern needs layers_to_transform", target_modules=["q"], layers_pattern="layers"),
    config_case("layers-with-regex", r"layers_to_transform cannot be combined with a regex", target_modules=".*q",
                layers_to_transform=[0]),
    config_case("layers-string", r"layers_to_transform must be an int or a list of ints", target_modules=["q"],
                layers_to_transform="0"),
    config_case("fan-in-fan-out-string", r"fan_in_fan_out must be True or False", target_modules=["q"], fan_in_fan_out="yes"),
    config_case("rslora-int", r"use_rslora must be True or False", target_modules=["q"], use_rslora=1),
    # Injecting (get_adapter_model / add_adapter)
    Case("config-dict", ConfigError, r"config must be an adapterflow.LoraConfig, got builtins.dict.*LoraConfig.from_dict",
         lambda env: lambda: get_adapter_model(env.load_base(), dict(LORA))),
    Case("config-peft", ConfigError, r"config must be an adapterflow.LoraConfig, got peft\..*LoraConfig.*peft_config.to_dict",
         lambda env: lambda: get_adapter_model(env.load_base(), peft.LoraConfig(**LORA))),
    Case("model-none", TypeError, r"model must be a torch.nn.Module",
         lambda env: lambda: get_adapter_model(None, LoraConfig(**LORA))),
    Case("targets-match-nothing", TargetError, r"target_modules \['query'\] matches no adaptable module",
         lambda env: lambda: get_adapter_model(env.load_base(), LoraConfig(target_modules=["query"]))),
    Case("unsupported-layer", TargetError, r"'model.norm' \(LlamaRMSNorm\) matches target_modules",
         lambda env: lambda: get_adapter_model(env.load_base(), LoraConfig(target_modules=["norm"]))),
    Case("layer-index-out-of-range", TargetError, r"layers_to_transform=\[5\].*layer indices are \[0, 1\]",
         lambda env: lambda: get_adapter_model(env.load_base(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))),
    Case("modules-to-save-nothing", TargetError, r"modules_to_save \['classifier'\] matches no module",
         lambda env: lambda: get_adapter_model(env.load_base(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))),
    Case("adapter-name-dot", ValueError, r"Invalid adapter name 'a.b'",
         lambda env: lambda: get_adapter_model(env.load_base(), LoraConfig(**LORA), adapter_name="a.b")),
    Case("pissa-tied", ValueError, r"lm_head: its weight is shared .*tie_word_embeddings=False",
         lambda env: lambda: get_adapter_model(load_llama(env.tied_base_dir), LoraConfig(init_lora_weights="pissa",
                                                                                            target_modules=["lm_head"]))),
    Case("add-existing-name", ValueError, r"Adapter 'default' already exists",
         lambda env: (lambda m: lambda: m.add_adapter("default", LoraConfig(**LORA)))(env.model())),
    add_case("add-config-dict", ConfigError, r"config must be an adapterflow.LoraConfig", LORA, lambda: dict(LORA, r=2)),
    add_case("add-bias-second", ConfigError, r"bias='all' \(new\).*only a single adapter", LORA,
             dict(r=2, target_modules=["k_proj"], bias="all")),
    add_case("add-pissa-second", ConfigError, r"init_lora_weights='pissa' rewrites the base weights", LORA,
             dict(r=2, target_modules=["k_proj"], init_lora_weights="pissa")),
    add_case("add-modules-to-save-on-lora", ConfigError, r"modules_to_save 'model.layers.0.self_attn.q_proj' holds LoRA",
             LORA, dict(r=2, target_modules=["k_proj"], modules_to_save=["q_proj"])),
    load_second_case("load-bias-second", ConfigError, r"bias='lora_only' \(new\)", dict(r=2, target_modules=["k_proj"],
                                                                                        bias="lora_only")),
    load_second_case("load-unconverted-pissa-second", ConfigError, r"'pissa' rewrites the base weights", PISSA),
    # Loading files (AdapterLoadError naming the file; FileNotFoundError naming the folder)
    load_case("config-list", AdapterLoadError, r"adapter_config.json holds a JSON list",
              lambda env: env.edit_config(env.saved(), "[1, 2]")),
    load_case("config-null", AdapterLoadError, r"adapter_config.json holds a JSON NoneType",
              lambda env: env.edit_config(env.saved(), "null")),
    load_case("config-broken-json", AdapterLoadError, r"adapter_config.json is not readable JSON",
              lambda env: env.edit_config(env.saved(), "{not json")),
    load_case("config-empty", AdapterLoadError, r"adapter_config.json is not readable JSON",
              lambda env: env.edit_config(env.saved(), "")),
    load_case("config-binary", AdapterLoadError, r"adapter_config.json is not readable JSON",
              lambda env: (env.saved() / "adapter_config.json").write_bytes(b"\xff\xfe\x00") and env.saved()),
    load_case("config-r-string", ConfigError, r"r must be a positive integer, got 'four'", lambda env: env.config_with(r="four")),
    load_case("config-alpha-nan", ConfigError, r"lora_alpha must be a finite number, got nan",
              lambda env: env.config_with(lora_alpha=math.nan)),
    load_case("config-rank-pattern-list", ConfigError, r"rank_pattern must be a dict", lambda env: env.config_with(rank_pattern=[1])),
    load_case("config-dora", ConfigError, r"use_dora=True switches on a PEFT feature", lambda env: env.config_with(use_dora=True)),
    load_case("config-peft-type", ConfigError, r"peft_type 'IA3'", lambda env: env.config_with(peft_type="IA3")),
    load_case("config-init-olora", ConfigError, r"init_lora_weights='olora'", lambda env: env.config_with(init_lora_weights="olora")),
    load_case("weights-random-bytes", AdapterLoadError, r"adapter_model.safetensors \(64 bytes\) is not a readable safetensors",
              write_weights_file(b"\x13" * 64)),
    load_case("weights-empty", AdapterLoadError, r"adapter_model.safetensors is empty \(0 bytes\)", write_weights_file(b"")),
    load_case("weights-truncated", AdapterLoadError, r"adapter_model.safetensors .*truncated or corrupt", truncated),
    load_case("weights-header-only", AdapterLoadError, r"adapter_model.safetensors \(8 bytes\)",
              write_weights_file((1 << 40).to_bytes(8, "little"))),
    load_case("bin-pickle-payload", AdapterLoadError, r"adapter_model.bin holds pickled Python objects.*refused for safety",
              write_weights_file(pickle.dumps({"x": _Exploit()}), "adapter_model.bin")),
    load_case("bin-truncated", AdapterLoadError, r"adapter_model.bin \(\d+ bytes\) is not a readable PyTorch checkpoint",
              truncated_bin),
    load_case("bin-empty", AdapterLoadError, r"adapter_model.bin is empty", write_weights_file(b"", "adapter_model.bin")),
    load_case("bin-list-of-tensors", AdapterLoadError, r"adapter_model.bin does not hold a dict of tensors",
              lambda env: (torch.save([torch.zeros(2)], env.saved("bin", safe=False) / "adapter_model.bin"),
                           env.saved("bin"))[1]),
    load_case("missing-folder", FileNotFoundError, r"No adapter folder at .*nope", lambda env: env.tmp / "nope"),
    load_case("missing-weights", FileNotFoundError, r"No adapter weights in .*adapter: expected adapter_model.safetensors",
              lambda env: ((env.saved() / "adapter_model.safetensors").unlink(), env.saved())[1]),
    load_case("missing-config", FileNotFoundError, r"No adapter_config.json at",
              lambda env: ((env.saved() / "adapter_config.json").unlink(), env.saved())[1]),
    load_case("missing-key", AdapterLoadError, r"missing from the checkpoint \(1\):\n    .*layers.1.self_attn.v_proj.lora_B.weight",
              drop_key),
    load_case("rank-does-not-fit", AdapterLoadError, r"shape mismatch \(8\)", lambda env: env.config_with(r=2)),
    # Saving
    save_case("save-into-a-file", ValueError, r"should be a directory, not a file",
              lambda env: (env.tmp / "file").write_text("keep") and env.tmp / "file"),
    save_case("save-through-a-file", NotADirectoryError, r"file",
              lambda env: ((env.tmp / "file").write_text("keep"), env.tmp / "file" / "sub" / "adapter")[1]),
    save_case("selected-unknown", ValueError, r"selected_adapters.*got \['nope'\]", lambda env: env.tmp / "out",
              selected_adapters=["nope"]),
    save_case("selected-string", TypeError, r"selected_adapters must be a list", lambda env: env.tmp / "out",
              selected_adapters="default"),
    save_case("unknown-keyword", TypeError, r"safe_serialisation", lambda env: env.tmp / "out", safe_serialisation=False),
    save_case("embedding-flag", ValueError, r"save_embedding_layers must be True, False or 'auto'", lambda env: env.tmp / "out",
              save_embedding_layers="yes"),
    save_case("disk-full-safetensors", OSError, rf"Could not save into .*/out: No space left on device.*about {LORA_BYTES} bytes",
              lambda env: env.tmp / "out", not_in_message=".staging-", patch=enospc_on("writev")),
    save_case("disk-full-bin", OSError, rf"Could not save into .*/out: No space left on device.*about {LORA_BYTES} bytes",
              lambda env: env.tmp / "out", not_in_message=".staging-", patch=enospc_on("write"), safe_serialization=False),
    save_case("disk-full-over-existing", OSError, r"Could not save into .*/adapter: No space left",
              lambda env: env.saved(), not_in_message=".staging-", patch=enospc_on("writev")),
    save_case("read-only-target", OSError, r"Could not save into .*/out: Read-only file system",
              lambda env: env.tmp / "out", not_in_message=".staging-", patch=read_only_staging),
    save_case("alias-and-path-disagree", ValueError, r"convert_pissa_to_lora and path_initial_model_for_weight_conversion",
              lambda env: env.tmp / "out", model=lambda env: env.trained_pissa(), convert_pissa_to_lora="a",
              path_initial_model_for_weight_conversion="b"),
    # PiSSA -> LoRA conversion
    conversion_case("initial-missing", FileNotFoundError, r"No initial adapter at .*nope", lambda env: env.trained_pissa(),
                    initial="nope"),
    conversion_case("initial-plain-lora", ConversionError, r"initial adapter is not the PiSSA initialisation.*A0 @ A0.T",
                    lora_initial),
    conversion_case("initial-other-base", ConversionError, r"not the PiSSA initialisation of this model's base.*residual",
                    other_base_initial),
    conversion_case("initial-other-alpha", ConversionError, r"scaling differs: trained lora_alpha=8.*initial lora_alpha=4",
                    other_alpha_initial),
    conversion_case("initial-gaussian-config", ConversionError, r"init_lora_weights='gaussian', not a PiSSA",
                    gaussian_initial),
    conversion_case("conversion-two-adapters", ValueError, r"converts one adapter.*selected_adapters", two_adapters),
    conversion_case("conversion-disk-full", OSError, r"Could not save into .*/out: No space left on device",
                    lambda env: env.trained_pissa(), patch=enospc_on("writev")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_clear_error_and_changes_nothing_on_disk(case, tmp_path, load_base, monkeypatch, tied_base_dir):
    env = Env(tmp_path / "work", load_base, monkeypatch, tied_base_dir)
    env.tmp.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call = case.action(env)
        before = tree_hash(tmp_path)
        with pytest.raises(case.error, match=case.match) as info:
            call()
    monkeypatch.undo()
    assert tree_hash(tmp_path) == before, "the refused call changed the disk"
    assert type(info.value).__module__ in ("adapterflow.config", "adapterflow.serialization", "adapterflow.targeting",
                                           "adapterflow.conversion", "builtins"), type(info.value)
    if case.not_in_message:
        assert case.not_in_message not in str(info.value)
    assert "weights_only=False" not in str(info.value)


def test_the_battery_is_big_enough():
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)
