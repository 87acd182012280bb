"""The serving preflight (`adapterflow.serving.check_serving`): one small adapter per rule that breaks it, written
by our library and by PEFT where both can express the config (both must get the same verdicts), against the
tiny Llama base read from its safetensors headers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterflow import LoraConfig, get_adapter_model
from adapterflow.serving import RUNTIMES, check_serving
from adapterflow.serving_files import BaseShapes, read_base_shapes
from tiny import load_llama, save_tiny_llama

QV = ["q_proj", "v_proj"]
# (case id, LoraConfig kwargs, save kwargs, writers, [(runtime, rule, verdict, message fragment)], base fixture)
CASES = [
    ("all_linear_default", dict(r=8, lora_alpha=16, target_modules="all-linear"), {}, "both", [], "base_dir"),
    ("modules_to_save", dict(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"]), {}, "both",
     [("vllm", "modules_to_save", "fail", "modules_to_save [lm_head]: vLLM refuses it; retrain without it or serve "
                                          "with PEFT"),
      ("vllm", "weight_keys", "fail", "lm_head.weight"),
      ("llama.cpp", "modules_to_save", "fail", "llama.cpp refuses it"),
      ("llama.cpp", "weight_keys", "fail", "Embeddings is present in the adapter")], "base_dir"),
    ("bias_all", dict(r=4, lora_alpha=8, target_modules=QV, bias="all"), {}, "both",
     [("vllm", "bias", "fail", "bias='all': vLLM refuses adapter biases; retrain with bias='none'"),
      ("vllm", "weight_keys", "fail", "biases: retrain with bias='none'"),
      ("llama.cpp", "bias", "fail", "bias='all'"), ("llama.cpp", "weight_keys", "fail", ".bias")], "base_dir"),
    ("bias_lora_only", dict(r=4, lora_alpha=8, target_modules=QV, bias="lora_only"), {}, "both",
     [("vllm", "bias", "fail", "bias='lora_only'"), ("llama.cpp", "bias", "fail", "bias='lora_only'"),
      ("llama.cpp", "weight_keys", "fail", "q_proj.base_layer.bias")],  # vLLM skips every base_layer key
     "base_dir"),
    ("dora", dict(r=4, lora_alpha=8, target_modules=QV, use_dora=True), {}, "peft",
     [("vllm", "use_dora", "fail", "vLLM does not support DoRA"), ("vllm", "weight_keys", "fail", "DoRA magnitudes"),
      ("llama.cpp", "use_dora", "fail", "llama.cpp does not support DoRA"),
      ("llama.cpp", "weight_keys", "fail", "lora_magnitude_vector")], "base_dir"),
    ("lora_bias", dict(r=4, lora_alpha=8, target_modules=QV, lora_bias=True), {}, "peft",
     [("vllm", "bias", "fail", "lora_bias"), ("vllm", "weight_keys", "fail", "lora_B.bias"),
      ("llama.cpp", "bias", "fail", "lora_bias"), ("llama.cpp", "weight_keys", "fail", "lora_B.bias")], "base_dir"),
    ("rslora", dict(r=4, lora_alpha=8, target_modules=QV, use_rslora=True), {}, "both",
     [("llama.cpp", "use_rslora", "fail", "use_rslora: llama.cpp will scale by alpha/r, off by sqrt(r); set "
                                         "use_rslora=false or rescale alpha")], "base_dir"),
    ("alpha_pattern", dict(r=4, lora_alpha=8, target_modules=QV, alpha_pattern={"v_proj": 32}), {}, "both",
     [("llama.cpp", "alpha_pattern", "fail", "llama.cpp stores one alpha (8)")], "base_dir"),
    ("rank_pattern_is_fine_for_llama_cpp", dict(r=4, lora_alpha=8, target_modules=QV, rank_pattern={"v_proj": 2}),
     {}, "both", [], "base_dir"),
    ("rank_above_vllm_default", dict(r=32, lora_alpha=32, target_modules=QV), {}, "both",
     [("vllm", "max_lora_rank", "warn", "start vLLM with --max-lora-rank 32")], "base_dir"),
    ("rank_pattern_above_vllm_default", dict(r=8, lora_alpha=8, target_modules=QV, rank_pattern={"v_proj": 20}), {},
     "both", [("vllm", "max_lora_rank", "warn", "rank 20 is above vLLM's default --max-lora-rank 16")], "base_dir"),
    ("full_embeddings_saved", dict(r=4, lora_alpha=8, target_modules=QV), dict(save_embedding_layers=True), "both",
     [("vllm", "weight_keys", "fail", "embed_tokens.weight"),
      ("llama.cpp", "weight_keys", "fail", "save_embedding_layers=false")], "base_dir"),
    ("embedding_lora", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
     dict(save_embedding_layers=False), "both", [], "base_dir"),
    ("lm_head_on_tied_base", dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
     dict(save_embedding_layers=False), "both",
     [("llama.cpp", "tied_lm_head", "fail", "base ties it to the embeddings")], "tied_base_dir"),
    ("pissa_unconverted", dict(r=4, lora_alpha=4, target_modules=QV, init_lora_weights="pissa"), {}, "both",
     [("vllm", "init_lora_weights", "fail", "save.convert_pissa_to_lora=true"),
      ("llama.cpp", "init_lora_weights", "fail", "residual"),
      ("peft", "init_lora_weights", "warn", "PEFT rebuilds the residual base")], "base_dir"),
    ("pissa_niter_unconverted", dict(r=4, lora_alpha=4, target_modules=QV, init_lora_weights="pissa_niter_2"), {},
     "both", [("vllm", "init_lora_weights", "fail", "pissa_niter_2"), ("llama.cpp", "init_lora_weights", "fail", "residual"),
              ("peft", "init_lora_weights", "fail", "re-runs the randomized SVD")], "base_dir"),
]


def write_ours(base_dir: Path, path: Path, config: dict, save: dict) -> Path:
    model = get_adapter_model(load_llama(base_dir), LoraConfig(task_type="CAUSAL_LM", **config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **save)
    return path


def write_peft(base_dir: Path, path: Path, config: dict, save: dict) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_llama(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **config))
        model.save_pretrained(path, **save)
    return path


def verdicts(report) -> dict[tuple[str, str], str]:
    return {(r.runtime, r.rule): r.verdict for r in report.results}


@pytest.mark.parametrize("case, config, save, writers, expected, base_name", CASES, ids=[c[0] for c in CASES])
def test_each_rule_against_adapters_written_by_us_and_by_peft(request, tmp_path, case, config, save, writers,
                                                              expected, base_name):
    base = request.getfixturevalue(base_name)
    written = {"peft": write_peft(base, tmp_path / "peft", config, save)}
    if writers == "both":
        written["ours"] = write_ours(base, tmp_path / "ours", config, save)
    reports = {writer: check_serving(path, base=base) for writer, path in written.items()}
    for writer, report in reports.items():
        found = {(r.runtime, r.rule): r for r in report.results}
        for runtime, rule, verdict, fragment in expected:
            result = found[(runtime, rule)]
            assert (result.verdict, writer) == (verdict, writer), result
            assert fragment in result.message, (writer, result.message)
        unexpected = {k for k, v in verdicts(report).items() if v != "pass"} - {(e[0], e[1]) for e in expected}
        assert not unexpected, (writer, [found[k] for k in unexpected])
        failing = {e[0] for e in expected if e[2] == "fail"}
        assert {rt for rt in RUNTIMES if not report.passed(rt)} == failing
    if "ours" in reports:
        assert verdicts(reports["ours"]) == verdicts(reports["peft"])


def test_explicit_max_lora_rank_fails_a_larger_rank(base_dir, tmp_path):
    path = write_ours(base_dir, tmp_path / "a", dict(r=32, lora_alpha=32, target_modules=QV), {})
    report = check_serving(path, base=base_dir, runtimes=("vllm",), max_lora_rank=16)
    assert report.failed_rules("vllm") == ["max_lora_rank"]
    assert "rank 32 > --max-lora-rank 16" in report.rules("vllm")[1].message
    assert check_serving(path, runtimes=("vllm",), max_lora_rank=32).passed("vllm")


def test_a_module_path_the_base_lacks_is_the_silent_no_op(base_dir, tmp_path):
    """vllm#34186: keys saved without the inner `model.` match vLLM's module names by their last component, so
    vLLM loads them and serves the base model. Only the full-path check against the base finds it."""
    path = write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=QV), {})
    weights = path / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    assert check_serving(path, runtimes=("vllm",)).passed("vllm")  # without a base nothing can tell
    report = check_serving(path, base=base_dir)
    for runtime in RUNTIMES:
        assert report.failed_rules(runtime) == ["module_paths"], runtime
    message = report.rules("vllm")[-2].message
    assert "8 tensor(s) do not fit" in message, message
    assert "layers.0.self_attn.q_proj.lora_A/lora_B (no layers.0.self_attn.q_proj.weight in the base" in message
    assert message.count("q_proj.lora_A") == 1 and message.count("(no layers.0.self_attn.q_proj.weight") == 1
    assert "it has model.layers.0.self_attn.q_proj" in message and "vllm#34186" in message


def test_another_base_shape_or_vocabulary_fails(base_dir, tmp_path):
    wide = save_tiny_llama(tmp_path / "wide", hidden_size=64)
    path = write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=["q_proj"]), {})
    report = check_serving(path, base=wide, runtimes=("vllm", "peft"))
    assert report.failed_rules("vllm") == ["module_paths"] == report.failed_rules("peft")
    message = report.rules("vllm")[-2].message
    assert "4 tensor(s) do not fit" in message and "model.layers.0.self_attn.q_proj.lora_A.weight (4, 32) does not " \
        "fit the base weight model.layers.0.self_attn.q_proj.weight (64, 64)" in message, message
    path = write_ours(base_dir, tmp_path / "e", dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
                      dict(save_embedding_layers=False))
    report = check_serving(path, base=save_tiny_llama(tmp_path / "vocab", vocab_size=160), runtimes=("vllm", "peft"))
    assert report.failed_rules("vllm") == ["module_paths", "vocab"] == report.failed_rules("peft")
    vllm = {r.rule: r.message for r in report.rules("vllm")}
    assert "vocabulary [128]" in vllm["vocab"] and "has 160" in vllm["vocab"] and "PR #28382" in vllm["vocab"]


def test_files_the_runtimes_cannot_read(base_dir, tmp_path):
    path = write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=QV), {})
    state = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(state, path / "adapter_model.pt")
    report = check_serving(path, base=base_dir)
    assert report.passed("vllm") and report.failed_rules("llama.cpp") == ["weights_file"]
    assert "llama.cpp reads adapter_model.safetensors or adapter_model.bin, found only adapter_model.pt" in \
        report.rules("llama.cpp")[8].message
    one_sided = {k: v for k, v in state.items() if ".v_proj.lora_B" not in k}
    torch.save(one_sided, path / "adapter_model.pt")
    report = check_serving(path, base=base_dir)
    assert report.failed_rules("llama.cpp") == ["weights_file", "lora_pairs"] and "v_proj.lora_A.weight" in \
        report.rules("llama.cpp")[10].message


def test_config_keys_and_peft_type(base_dir, tmp_path):
    path = write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=QV), {})
    config = json.loads((path / "adapter_config.json").read_text())
    del config["target_modules"], config["peft_type"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    report = check_serving(path, base=base_dir)
    assert report.failed_rules("vllm") == ["config_keys"] and "lacks target_modules" in report.rules("vllm")[0].message
    assert report.failed_rules("peft") == ["peft_type"] and report.passed("llama.cpp")


def test_a_bin_file_a_sharded_base_and_a_manifest_are_read(base_dir, tmp_path):
    path = write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules="all-linear"),
                      dict(safe_serialization=False))
    (path / "adapterflow.json").write_text('{"files": {}}')  # the integrity manifest of #16 is not a weight
    load_llama(base_dir).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert read_base_shapes(tmp_path / "sharded").shapes == read_base_shapes(base_dir).shapes
    report = check_serving(path, base=tmp_path / "sharded")
    assert report.passed() and report.rules("vllm")[7].message == "reads adapter_model.bin"
    shapes = read_base_shapes(base_dir)  # a shapes dict, as the CLI builds one from Hub metadata
    assert check_serving(path, base=BaseShapes(shapes.config, shapes.shapes, "org/tiny")).base == "org/tiny"


def test_report_dict_and_usage_errors(base_dir, tmp_path):
    path = write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=QV, use_rslora=True), {})
    data = json.loads(json.dumps(check_serving(path, runtimes=("vllm", "llama.cpp")).to_dict()))
    assert data["passed"] is False and list(data["runtimes"]) == ["vllm", "llama.cpp"]
    assert data["runtimes"]["llama.cpp"]["failed_rules"] == ["use_rslora"] and data["runtimes"]["vllm"]["passed"]
    with pytest.raises(ValueError, match="unknown runtime 'tgi'"):
        check_serving(path, runtimes=("tgi",))
    with pytest.raises(ValueError, match="max_lora_rank=12"):
        check_serving(path, max_lora_rank=12)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        check_serving(tmp_path)


def test_check_config_runs_only_the_rules_a_config_can_decide():
    """What the pipeline checks before training: the rules that read adapter_config.json alone."""
    from adapterflow.serving import CONFIG_RULES, check_config

    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM").to_dict()
    report = check_config(config)
    assert report.passed() and {r.rule for r in report.results} <= CONFIG_RULES
    assert {r.rule for r in report.rules("llama.cpp")} >= {"use_rslora", "alpha_pattern", "bias"}
    refused = check_config({**config, "bias": "all", "use_rslora": True}, ("vllm", "llama.cpp"))
    assert refused.failed_rules("vllm") == ["bias"] and refused.failed_rules("llama.cpp") == ["bias", "use_rslora"]


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.mark.parametrize("write", [write_ours, write_peft], ids=["ours", "peft"])
def test_a_base_layer_copy_is_named_as_skipped_not_counted_as_lora(base_dir, tmp_path, write):
    """save_embedding_layers=True with lm_head targeted writes lm_head.base_layer.weight (a full copy, 128 x 32
    fp32 = 16 KiB): vLLM and llama.cpp skip such keys, so it passes, and the message says exactly that."""
    path = write(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
                 dict(save_embedding_layers=True))
    report = check_serving(path, base=base_dir)
    assert report.passed(), [r for r in report.results if r.verdict != "pass"]
    messages = {r.runtime: r.message for r in report.results if r.rule == "weight_keys"}
    assert messages == {rt: f"6 LoRA A/B tensors; 1 base_layer key skipped by {label} (lm_head.base_layer.weight, "
                            f"16 KiB not needed for serving)" for rt, label in (("vllm", "vLLM"), ("llama.cpp", "llama.cpp"))}
    module_paths = {r.message for r in report.results if r.rule == "module_paths"}
    assert module_paths == {f"every module path of the 6 tensors exists in {base_dir}"}


def test_a_config_rank_the_tensors_disagree_with_fails_everywhere(base_dir, tmp_path):
    path = edit_config(write_ours(base_dir, tmp_path / "r", dict(r=4, lora_alpha=8, target_modules=QV), {}), r=8)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the oracle: PEFT refuses it
        peft.PeftModel.from_pretrained(load_llama(base_dir), str(path))
    report = check_serving(path, base=base_dir)
    for runtime in RUNTIMES:
        assert report.failed_rules(runtime) == ["lora_rank"], runtime
    rank = {r.runtime: r.message for r in report.results if r.rule == "lora_rank"}
    assert "4 module(s)" in rank["vllm"] and "model.layers.0.self_attn.q_proj (config rank 8 from r, tensor rank 4)" \
        in rank["vllm"] and "vLLM scales by lora_alpha / r with the config's r" in rank["vllm"], rank["vllm"]
    assert "llama.cpp takes the rank from the tensor shape" in rank["llama.cpp"]
    assert "PEFT builds each module with the config's rank" in rank["peft"]

    pattern = edit_config(write_ours(base_dir, tmp_path / "p", dict(r=4, lora_alpha=8, target_modules=QV), {}),
                          rank_pattern={"v_proj": 2})
    message = {r.rule: r.message for r in check_serving(pattern, runtimes=("peft",)).results}["lora_rank"]
    assert "model.layers.0.self_attn.v_proj (config rank 2 from rank_pattern['v_proj'], tensor rank 4)" in message
    assert "q_proj" not in message.split(";")[0], message

    chained = write_ours(base_dir, tmp_path / "ab", dict(r=4, lora_alpha=8, target_modules=QV), {})
    state = load_file(chained / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    state[key] = state[key][:, :2].contiguous()
    save_file(state, chained / "adapter_model.safetensors", metadata={"format": "pt"})
    report = check_serving(chained, runtimes=("vllm", "llama.cpp"))
    assert report.failed_rules("vllm") == ["lora_rank"] == report.failed_rules("llama.cpp")
    assert "1 module(s)" in report.rules("vllm")[9].message
    assert "model.layers.1.self_attn.q_proj (lora_A rank 4, lora_B rank 2)" in report.rules("vllm")[9].message


def test_a_target_module_the_base_lacks_is_a_warning_naming_it(base_dir, tied_base_dir, tmp_path):
    path = edit_config(write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=QV), {}),
                       target_modules=["q_proj", "v_prj"])
    peft.PeftModel.from_pretrained(load_llama(base_dir), str(path))  # the oracle: PEFT loads the rest, no error
    report = check_serving(path, base=base_dir)
    assert report.passed()
    found = {r.runtime: r for r in report.results if r.rule == "target_modules"}
    assert {r.verdict for r in found.values()} == {"warn"} and set(found) == set(RUNTIMES)
    assert "target_modules ['v_prj'] match no module of" in found["peft"].message
    assert "did you mean 'v_proj'?" in found["peft"].message, found["peft"].message
    assert {r.verdict for r in check_serving(path).results if r.rule == "target_modules"} == {"pass"}  # no base
    tied = write_ours(base_dir, tmp_path / "t", dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
                      dict(save_embedding_layers=False))
    tied_report = check_serving(tied, base=tied_base_dir, runtimes=("peft",))
    assert {r.rule: r.verdict for r in tied_report.results}["target_modules"] == "pass"  # no lm_head.weight stored


def test_without_a_base_the_module_path_warning_is_the_runtimes_own(base_dir, tmp_path):
    path = write_ours(base_dir, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=QV), {})
    found = {r.runtime: r for r in check_serving(path).results if r.rule == "module_paths"}
    assert {r.verdict for r in found.values()} == {"warn"}
    assert "vLLM serve the base model silently, vllm#34186" in found["vllm"].message
    assert "Can not map tensor" in found["llama.cpp"].message and "vLLM" not in found["llama.cpp"].message
    assert "informational for PEFT" in found["peft"].message and "vLLM" not in found["peft"].message
