"""`adapterflow check`: the serving preflight from the command line. Exit 0 when every runtime asked for passes,
1 when one fails, 2 on a usage error (one line, no traceback); --json is the report's dict; a Hub base is read
from the local Hub-protocol server (config.json and safetensors headers only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapterflow import LoraConfig, get_adapter_model
from adapterflow.flows.cli import main
from tiny import load_llama

TOKEN = "hf_check_test_token"


def save(base_dir: Path, path: Path, **config) -> Path:
    model = get_adapter_model(load_llama(base_dir), LoraConfig(task_type="CAUSAL_LM", **config))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"ok": save(base_dir, root / "ok", r=8, lora_alpha=16, target_modules="all-linear"),
            "mts": save(base_dir, root / "mts", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])}


def check(capfd, *arguments) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["check", *map(str, arguments)])
    out, err = capfd.readouterr()
    return exit_info.value.code, out, err


def test_an_adapter_that_serves_exits_0(capfd, adapters, base_dir):
    code, out, err = check(capfd, adapters["ok"], "--base", base_dir)
    assert code == 0, out + err
    assert "vLLM: pass" in out and "llama.cpp: pass" in out and "PEFT: pass" in out
    assert "  pass  module_paths       every module path of the 28 tensors exists in" in out


def test_a_refused_adapter_exits_1_naming_the_rule_and_the_fix(capfd, adapters, base_dir):
    code, out, err = check(capfd, adapters["mts"], "--base", base_dir)
    assert code == 1 and err == "", err
    assert "vLLM: FAIL (modules_to_save, weight_keys)" in out and "PEFT: pass" in out
    assert "FAIL  modules_to_save    modules_to_save [lm_head]: vLLM refuses it; retrain without it or serve with " \
           "PEFT" in out
    assert check(capfd, adapters["mts"], "--runtime", "peft")[0] == 0  # only the runtimes asked for count


def test_json_report(capfd, adapters):
    code, out, _ = check(capfd, adapters["mts"], "--json", "--runtime", "vllm,llama_cpp", "--max-lora-rank", "8")
    data = json.loads(out)
    assert code == 1 and list(data["runtimes"]) == ["vllm", "llama.cpp"] and data["base"] is None
    assert data["runtimes"]["vllm"]["failed_rules"] == ["modules_to_save", "weight_keys"]
    assert {r["rule"]: r["verdict"] for r in data["runtimes"]["vllm"]["rules"]}["module_paths"] == "warn"


USAGE_CASES = [
    (["missing-folder"], ["ADAPTER_DIR missing-folder: no such folder"]),
    (["{ok}", "--runtime", "vllm,tgi"], ["--runtime 'vllm,tgi': unknown runtime tgi", "vllm, llama.cpp, peft"]),
    (["{ok}", "--runtime", ","], ["unknown runtime (none given)"]),
    (["{ok}", "--max-lora-rank", "12"], ["--max-lora-rank '12'", "1, 8, 16, 32, 64, 128, 256, 320, 512"]),
    (["{ok}", "--max-lora-rank", "big"], ["--max-lora-rank 'big'"]),
    (["{ok}", "--base", "not//valid"], ["--base not//valid: neither an existing folder nor a Hub repo id"]),
    (["{ok}", "--base", ""], ["--base is empty"]),
    (["{ok}", "--base", "{empty}"], ["is not a model folder: it has no config.json"]),
    (["{empty}"], ["has no adapter_config.json"]),
    (["{ok}/adapter_config.json"], ["is a file, and an adapter is a folder", "pass that folder (this one is in "]),
    (["data.jsonl"], ["ADAPTER_DIR data.jsonl: is a file, and an adapter is a folder"]),
    (["run"], ["ADAPTER_DIR run: has no adapter_config.json, but run/adapter does: pass `adapterflow check "
               "run/adapter`"]),
    (["{ok}", "--base", "models/nope"], ["--base models/nope: no such folder"]),
    (["{ok}", "--base", "./nope"], ["--base ./nope: no such folder"]),
    (["{broken}"], ["adapter_config.json is not readable JSON"]),
]


@pytest.mark.parametrize("arguments, fragments", USAGE_CASES, ids=[" ".join(c[0]) for c in USAGE_CASES])
def test_usage_errors_exit_2_with_one_line(capfd, adapters, tmp_path, monkeypatch, arguments, fragments):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"r": 8,')
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "models").mkdir()
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    names = {"ok": adapters["ok"], "empty": tmp_path / "empty", "broken": tmp_path / "broken"}
    code, out, err = check(capfd, *(a.format(**names) for a in arguments))
    assert code == 2 and out == "" and err.startswith("adapterflow check: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and all(f in err for f in fragments), err


def test_the_installed_command(adapters, base_dir):
    """The console script, as a user runs it: exit statuses and no traceback."""
    command = [sys.executable, "-m", "adapterflow.flows.cli", "check"]
    ok = subprocess.run([*command, adapters["ok"], "--base", base_dir], capture_output=True, text=True, timeout=120)
    refused = subprocess.run([*command, adapters["mts"]], capture_output=True, text=True, timeout=120)
    usage = subprocess.run([*command, "nowhere"], capture_output=True, text=True, timeout=120)
    assert (ok.returncode, refused.returncode, usage.returncode) == (0, 1, 2), (ok.stderr, refused.stderr)
    assert "Traceback" not in ok.stderr + refused.stderr + usage.stderr


def test_a_hub_base_is_read_from_its_headers(capfd, adapters, base_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from hub_server import HubServer, isolated_hub_client

    with isolated_hub_client(tmp_path / "hf"), HubServer(tmp_path / "hub", token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("tester/tiny-base")
        api.upload_folder(folder_path=base_dir, repo_id="tester/tiny-base")
        code, out, err = check(capfd, adapters["ok"], "--base", "tester/tiny-base")
        assert code == 0 and "base:    tester/tiny-base" in out, out + err
        downloads = [path for method, path, _ in server.requests if "/resolve/" in path]
        code, out, err = check(capfd, adapters["ok"], "--base", "tester/missing")
    assert code == 2 and "--base tester/missing: could not read it from the Hub" in err, err
    assert any(p.endswith("/config.json") for p in downloads)


@pytest.mark.parametrize("name, verdict", [("ok", 0), ("mts", 1)])
def test_a_reader_that_closes_the_pipe_early(adapters, name, verdict):
    """`adapterflow check ... | head -3`: no BrokenPipeError traceback, and the exit status is still the verdict's.
    First with the pipe's read end closed before the command writes (always EPIPE), then as head does it."""
    import os

    command = [sys.executable, "-m", "adapterflow.flows.cli", "check", str(adapters[name])]
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert (closed.returncode, closed.stderr) == (verdict, ""), closed.stderr
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as head:
        lines = [head.stdout.readline() for _ in range(3)]
        head.stdout.close()
        stderr = head.stderr.read()
        assert head.wait(timeout=120) == verdict and stderr == "", stderr
    assert lines[0].startswith("adapter: ")


def test_the_report_ends_with_the_manifest_and_a_changed_file_fails(capfd, adapters, tmp_path):
    import shutil

    code, out, _ = check(capfd, adapters["ok"])
    assert code == 0 and out.rstrip().endswith("manifest: pass (every file matches adapterflow.json)"), out
    flipped = Path(shutil.copytree(adapters["ok"], tmp_path / "flipped"))
    weights = flipped / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: every serving rule still passes, the file is not the saved one
    weights.write_bytes(bytes(data))
    code, out, _ = check(capfd, flipped)
    assert code == 1 and "vLLM: pass" in out and "manifest: FAIL" in out
    assert f"  - {weights}: sha256 " in out and "differs from" in out
    code, out, _ = check(capfd, flipped, "--json")
    report = json.loads(out)
    assert code == 1 and report["passed"] is True and report["manifest"]["status"] == "fail"
    assert len(report["manifest"]["problems"]) == 1
    (flipped / "adapterflow.json").unlink()  # a folder without a manifest (PEFT's): nothing to compare
    code, out, _ = check(capfd, flipped)
    assert code == 0 and "manifest: none (no adapterflow.json" in out
