"""`adapterflow run` given bad input, as a user would give it: from their own folder, with --set, --config files,
datasets and model folders. Each mistake ends the command with exit status 2 and one message that names the
parameter or file, with no Python traceback, nothing written, and (all of these are found before training) no
flow run started."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from adapterflow.flows.cli import main
from adapterflow.runtime.base_models import resolve_base_model
from test_names import BAD_NAME_CASES

ok_data = "\n".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer number {i}"}) for i in range(30))
FILES = {
    "data.jsonl": ok_data,
    "latin1.jsonl": b'{"text": "ok"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n',
    "broken.jsonl": '{"text": "ok"}\n{"text": \n',
    "nofields.jsonl": '{"text": "ok"}\n{"other": 1}\n',
    "empty.jsonl": "",
    "role.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                  '{"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "hello"}]}\n',
    "data.xml": "<rows/>\n",
    "cols.csv": "body\nhello\n",
    "typed.jsonl": '{"text": "ok"}\n{"text": 5}\n',
    "one.jsonl": '{"prompt": "a", "completion": "b"}\n',
    "unstable.yaml": 'dataset:\n  path: builtin:chat\n  chat_template: "{{ messages | length }}{% for m in messages %}'
                     '{{ m.content }}{% endfor %}"\n',
    "config-missing-model/weights.bin": "x",
    "a-file": "not a folder",
    "bad.yaml": "adapter:\n  r: [4\n",
    "list.yaml": "- adapter\n- training\n",
    "unknown.yaml": "adapter:\n  r: 4\ntraining:\n  steps: 5\n  stepz: 3\n",
    "latin1.yaml": b"adapter:\n  name: caf\xe9\n",
    "types.yaml": "training:\n  steps: many\n",
}

# (arguments after `adapterflow run`, fragments the message must contain)
CASES = [
    (["--set", "adapter.r=0"], ["adapter.r", "--set adapter.r=0", "greater than or equal to 1"]),
    (["--set", "training.stepz=3"], ["training.stepz", "unknown parameter", "did you mean training.steps"]),
    (["--set", "foo.bar=1"], ["foo", "unknown parameter"]),
    (["--set", "adapter.init=olora"], ["adapter.init", "olora"]),
    (["--set", "training.steps"], ["--set training.steps", "KEY=VALUE"]),
    (["--set", "=5"], ["--set =5", "KEY=VALUE"]),
    (["--set", "adapter.r=[4"], ["--set adapter.r=[4", "not valid YAML"]),
    (["--set", "adapter.r=4", "--set", "adapter.r.x=1"], ["adapter.r is a value, not a section"]),
    (["--set", "training.steps=null"], ["training", "exactly one of training.steps and training.epochs"]),
    (["--set", "adapter.lora_dropout=1.5"], ["adapter.lora_dropout", "less than 1"]),
    (["--set", "dataset.eval_fraction=0"], ["dataset.eval_fraction", "greater than 0"]),
    (["--set", "training.learning_rate=fast"], ["training.learning_rate", "valid number"]),
    (["--set", "training.device=tpu"], ["training.device", "'auto', 'cpu' or 'cuda'"]),
    (["--set", "training.device=cuda"], ["training.device=cuda", "no CUDA device", "training.device=auto"]),
    (["--set", "training.precision=fp16"], ["training.precision=fp16", "needs a CUDA device", "training.precision=bf16"]),
    (["--set", "training.precision=fp16", "--set", "training.device=cpu"], ["training.precision=fp16", "training.device=cpu"]),
    (["--set", "training.precision=half"], ["training.precision", "'fp32', 'bf16' or 'fp16'"]),
    (["--set", "training.gradient_checkpointing=sometimes"], ["training.gradient_checkpointing", "valid boolean"]),
    (["--set", "training.log_every=0"], ["training.log_every", "greater than or equal to 1"]),
    (["--set", "training.eval_every=-5"], ["training.eval_every", "greater than or equal to 1"]),
    (["--set", "dataset.path=missing.jsonl"], ["dataset.path", "missing.jsonl", "not found"]),
    (["--set", "dataset.path=latin1.jsonl"], ["latin1.jsonl, line 3", "not UTF-8", "byte 0xe9"]),
    (["--set", "dataset.path=broken.jsonl"], ["broken.jsonl", "line 2: not JSON"]),
    (["--set", "dataset.path=nofields.jsonl"], ["nofields.jsonl", "line 2", '"text"']),
    (["--set", "dataset.path=empty.jsonl"], ["empty.jsonl", "no examples"]),
    (["--set", "dataset.path=data.xml"], ["data.xml", "extension '.xml'", ".parquet"]),
    (["--set", "dataset.path=cols.csv"], ["dataset.path", "cols.csv has columns ['body']", "dataset.text_field='text'",
                                          "dataset.text_field for plain text"]),
    (["--set", "dataset.path=cols.csv", "--set", "dataset.text_field=content"], ["dataset.text_field='content'"]),
    (["--set", "dataset.path=typed.jsonl"], ["typed.jsonl, line 2", "(dataset.text_field) holds int"]),
    (["--set", "dataset.path=data.jsonl", "--set", "dataset.split=test"],
     ["dataset.split='test'", "data.jsonl has no split 'test'", "available: ['train']"]),
    (["--set", "dataset.path=builtin:chat", "--set", "base_model.name_or_path=no-template"],
     ["dataset.chat_template", "no chat template", "a file holding it"]),
    (["--set", "dataset.path=builtin:chat", "--set", "dataset.chat_template=missing.jinja"],
     ["dataset.chat_template", "missing.jinja", "neither a Jinja template"]),
    (["--config", "unstable.yaml"], ["dataset.chat_template", "not prefix-stable"]),
    (["--set", "dataset.path=builtin:nope"], ["dataset.path", "Unknown builtin dataset 'nope'"]),
    (["--set", "base_model.name_or_path=./no-such-model"], ["base_model.name_or_path", "no-such-model", "does not exist"]),
    (["--set", "base_model.name_or_path=config-missing-model"], ["config-missing-model", "no config.json"]),
    (["--set", "base_model.name_or_path=a-file"], ["a-file", "is a file"]),
    (["--set", "base_model.name_or_path=builtin:gpt-7"], ["base_model.name_or_path", "builtin:gpt-7", "available"]),
    (["--set", "base_model.name_or_path=no-tokenizer"], ["base_model.name_or_path", "no tokenizer files"]),
    (["--set", "adapter.target_modules=[nonexistent_proj]"], ["adapter.target_modules", "nonexistent_proj"]),
    (["--set", "training.max_seq_len=4"], ["training.max_seq_len=4", "raise training.max_seq_len"]),
    (["--set", "dataset.path=one.jsonl"], ["one.jsonl: 1 example(s), of which 1 train and 0 held out", "add examples"]),
    (["--set", "base_model.dtype=bfloat16"], ["base_model.dtype=bfloat16", "verification would fail",
                                              "verify.atol"]),
    (["--set", "training.rdzv_endpoint=localhost:29500"], ["only used with training.nnodes > 1"]),
    (["--set", "save.output_dir=a-file/adapter"], ["save.output_dir", "a-file", "is a file"]),
    (["--set", "save.output_dir=a-file"], ["save.output_dir", "existing file"]),
    (["--set", "runs_root=a-file"], ["runs_root", "existing file"]),
    (["--set", "save.convert_pissa_to_lora=false"], ["adapter.init=pissa_niter_4", "save.convert_pissa_to_lora=true"]),
    (["--set", "save.selected_adapters=[other]"], ["save.selected_adapters", "['default']"]),
    (["--config", "missing.yaml"], ["--config missing.yaml", "no such file"]),
    (["--config", "bad.yaml"], ["--config bad.yaml, line 3", "not valid YAML"]),
    (["--config", "list.yaml"], ["--config list.yaml", "expected a mapping of parameter sections"]),
    (["--config", "unknown.yaml"], ["training.stepz (unknown.yaml, line 5)", "unknown parameter"]),
    (["--config", "latin1.yaml"], ["--config latin1.yaml, line 2", "not UTF-8"]),
    (["--config", "types.yaml"], ["training.steps (types.yaml, line 2)", "valid integer", "'many'"]),
    (["--config", "sub"], ["--config sub", "is a folder"]),
    (["--set", "dataset.path=sub"], ["dataset.path", "is a folder"]),
    (["--set", "save.output_dir=/proc/adapter"], ["save.output_dir", "cannot create folders in /proc"]),
    (["--set", "base_model.name_or_path=not//valid"], ["base_model.name_or_path", "neither an existing folder"]),
    (["--set", "run_name=../escape"], ["run_name", "names the run directory"]),
    (["--set", "adapter.target_modules=5"], ["adapter.target_modules (--set adapter.target_modules=5)"]),
    (["--set", "training.num_processes=3"], ["training.batch_size=16 is the global batch", "divisible by",
                                             "training.num_processes x training.nnodes = 3", "multiple of 3"]),
    (["--set", "training.num_processes=0"], ["training.num_processes", "greater than or equal to 1"]),
    (["--set", "training.strategy=deepspeed"], ["training.strategy", "'ddp' or 'fsdp'"]),
    (["--set", "training.nnodes=2"], ["training.nnodes=2 needs training.rdzv_endpoint", "host:port"]),
    (["--set", "training.nnodes=2", "--set", "training.rdzv_endpoint=node1"],
     ["training.rdzv_endpoint='node1' is not host:port", "node1.example.org:29500"]),
    (["--set", "training.rdzv_endpoint=node1:99999"], ["training.rdzv_endpoint='node1:99999' is not host:port"]),
    (["--set", "hub.push_merged=true"], ["hub.push_merged=true pushes the merged model", "set export.merged=true",
                                         "hub.push_merged=true needs hub.merged_repo_id"]),
    (["--set", "export.merged=true", "--set", "hub.push_merged=true"], ["needs hub.merged_repo_id"]),
    (["--set", "hub.merged_repo_id=me/merged"], ["hub.merged_repo_id='me/merged' is only used with hub.push_merged"]),
    (["--set", "export.merged=true", "--set", "hub.push_merged=true", "--set", "hub.repo_id=me/tiny",
      "--set", "hub.merged_repo_id=me/Tiny"], ["hub.merged_repo_id='me/Tiny' is also hub.repo_id", "another repo"]),
    (["--set", "hub.merged_repo_id=me/lora--v2"], ["hub.merged_repo_id", "validate_repo_id refuses it"]),
    (["--set", "export.merged=true", "--set", "export.dtype=bfloat16"],
     ["export.merged with export.dtype=bfloat16", "verify.atol (e.g. 0.2)", "export float32"]),
    (["--set", "export.merged=true", "--set", "base_model.dtype=bfloat16", "--set", "adapter.init=lora"],
     ["export.merged with base_model.dtype=bfloat16", "verify.atol"]),
    (["--set", "export.max_shard_size=5Gb"], ["export.max_shard_size", "GB, MB, KB, GiB, MiB or KiB", "as bits"]),
    (["--set", "export.dtype=int8"], ["export.dtype", "'float32', 'bfloat16' or 'float16'"]),
    (["--set", "export.merge=true"], ["export.merge", "unknown parameter", "did you mean export.merged"]),
    (["--set", "verify.require_runtimes=[vllm]", "--set", "adapter.bias=all"],
     ["verify.require_runtimes=['vllm']: vllm bias: bias='all': vLLM refuses adapter biases"]),
    (["--set", "verify.require_runtimes=[llama.cpp]", "--set", "adapter.use_rslora=true"],
     ["llama.cpp use_rslora: use_rslora: llama.cpp will scale by alpha/r, off by sqrt(r)"]),
    (["--set", "verify.require_runtimes=[tgi]"], ["verify.require_runtimes", "'vllm', 'llama.cpp' or 'peft'"]),
    (["--set", "mlflow.enabled=false", "--set", "promote.enabled=true"],
     ["promote.enabled=true needs mlflow.enabled=true", "promote.enabled=false"]),
    (["--set", "mlflow.alias=champion"], ["mlflow.alias='champion'", "promote.alias='champion'", "e.g. candidate"]),
    (["--set", "mlflow.alias=previous"], ["mlflow.alias='previous'", "former holder"]),
    (["--set", "promote.metric=exact_match"], ["promote.metric=exact_match needs evaluate.exact_match=true"]),
    (["--set", "promote.metric=accuracy"], ["promote.metric", "'eval_loss', 'perplexity' or 'exact_match'"]),
    (["--set", "promote.alias=previous"], ["promote.alias", "the alias the former holder gets"]),
    (["--set", "promote.alias=v2"], ["promote.alias", "reserves the alias 'latest' and version aliases"]),
    (["--set", "promote.min_improvement=-0.1"], ["promote.min_improvement", "greater than or equal to 0"]),
    (["--set", "promote.approval_timeout_minutes=0"], ["promote.approval_timeout_minutes", "greater than 0"]),
    (["--set", "promote.aliass=gold"], ["promote.aliass", "unknown parameter", "did you mean promote.alias"]),
    (["--set", "evaluate.max_new_tokens=0"], ["evaluate.max_new_tokens", "greater than or equal to 1"]),
    (["--set", "evaluate.dataset=missing.jsonl"], ["evaluate.dataset", "missing.jsonl", "not found"]),
    (["--set", "evaluate.dataset=data.jsonl", "--set", "evaluate.split=test"],
     ["evaluate.dataset", "data.jsonl has no split 'test'"]),
    (["--set", "hub.push_when_not_promoted=maybe"], ["hub.push_when_not_promoted", "valid boolean"]),
    # Newcomer findings (issue 15): each refused before training.
    (["--set", "promote.require_approval=true"],
     ["promote.require_approval=true needs a lasting Prefect server", "without PREFECT_API_URL",
      "approval_timeout_minutes=1440", "`prefect server start`", "set PREFECT_API_URL", "a deployment"]),
    (["--set", "promote.require_approval=true", "--set", "promote.enabled=false"],
     ["promote.require_approval=true with promote.enabled=false", "set promote.enabled=true"]),
    (["--set", "dataset.path=builtin:chat", "--set", "evaluate.exact_match=true"],
     ["evaluate.exact_match=true: the held-out examples of dataset.path='builtin:chat' have no prompt/completion",
      "(chat rows (messages))", "evaluate.exact_match=false"]),
    (["--set", "dataset.path=builtin:chat", "--set", "evaluate.exact_match=true", "--set", "promote.metric=exact_match"],
     ["promote.metric=exact_match with evaluate.exact_match=true", "no prompt/completion pairs"]),
    (["--set", "evaluate.dataset=builtin:chat", "--set", "evaluate.exact_match=true"],
     ["evaluate.dataset='builtin:chat' has no prompt/completion pairs"]),
    (["--set", "evaluate.split=test"], ["evaluate.split='test' without evaluate.dataset", "set evaluate.dataset"]),
    (["--set", "evaluate.dataset=builtin:instructions", "--set", "evaluate.split=validation"],
     ["evaluate.dataset: evaluate.split='validation'", "no split 'validation'"]),
    (["--set", "promote.min_improvement=nan"], ["promote.min_improvement", "a finite number greater than or equal to 0"]),
    (["--set", "promote.min_improvement=inf"], ["promote.min_improvement", "a finite number greater than or equal to 0"]),
    (["--set", "export.max_shard_size=0"], ["export.max_shard_size", "a number of bytes must be at least 1"]),
    (["--set", "mlflow.tracking_uri=htp://localhost:5000"],
     ["mlflow.tracking_uri='htp://localhost:5000'", "no tracking store for the scheme 'htp'", "http(s)://host:port"]),
    (["--set", "mlflow.tracking_uri=s3://bucket/mlruns"], ["scheme 's3'", "mlflow.enabled=false"]),
    (["--set", "mlflow.experiment="], ["mlflow.experiment (--set mlflow.experiment=): needs a value", "leave the key out"]),
    (["--set", "run_name=a/b"], ["'a/b' is not a plain name", "e.g. 'qwen-chat-1'"]),
    (["--set", "dataset.path=role.jsonl"], ["role.jsonl, line 2", "no 'assistant' message", "'assitant'"]),
    (["--set", "trainig.steps=5"], ["trainig (--set trainig.steps=5): unknown parameter", "did you mean training"]),
    (["--set", "base_model.name_or_path=sub/Qwen2.5-0.5B"], ["No folder sub/Qwen2.5-0.5B here"]),
]


@pytest.fixture
def user_folder(tmp_path, monkeypatch, base_dir):
    """A user's project folder with their files, as the current directory."""
    for name, content in FILES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "sub").mkdir()
    shutil.copytree(base_dir, tmp_path / "no-tokenizer")  # a model folder without tokenizer files
    shutil.copytree(resolve_base_model("builtin:tiny-llama"), tmp_path / "no-template",  # a tokenizer without one
                    ignore=shutil.ignore_patterns("chat_template.jinja"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("arguments, fragments", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_clear_message(user_folder, capfd, arguments, fragments):
    before = snapshot(user_folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *arguments])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2, err
    assert err.startswith("adapterflow run: ") and out == ""
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err and len(err.splitlines()) <= 6, err
    assert "Beginning flow run" not in err and "step 1/" not in err  # found before any flow or training started
    assert snapshot(user_folder) == before  # nothing written


@pytest.mark.parametrize("overrides, fragment", BAD_NAME_CASES, ids=[" ".join(c[0]) for c in BAD_NAME_CASES])
def test_bad_name_is_one_clear_message(user_folder, capfd, overrides, fragment):
    """Every name that reaches MLflow, the Hub or the file system, refused before anything starts."""
    before = snapshot(user_folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *[part for override in overrides for part in ("--set", override)]])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and "Traceback" not in err, err
    assert "Beginning flow run" not in err and snapshot(user_folder) == before


def test_a_tracking_uri_from_the_environment_is_checked_too(user_folder, capfd, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htps://bob:pw-123456@mlflow.example")
    before = snapshot(user_folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--set", "training.steps=1"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and "$MLFLOW_TRACKING_URI=" in err and "scheme 'htps'" in err, err
    assert "pw-123456" not in err and snapshot(user_folder) == before


def test_the_tracking_uri_schemes_are_mlflows():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from adapterflow.tasks.parameter_checks import MLFLOW_URI_SCHEMES

    assert sorted(MLFLOW_URI_SCHEMES) == sorted(_tracking_store_registry._registry)


def test_a_base_model_url_is_refused_without_its_password(user_folder, capfd):
    with pytest.raises(SystemExit):
        main(["run", "--set", "base_model.name_or_path=https://alice:s3cret-pw@models.example/qwen"])
    err = capfd.readouterr().err
    assert "base_model.name_or_path" in err and "is a URL" in err and "s3cret-pw" not in err, err


def test_every_problem_at_once(user_folder, capfd):
    """Several mistakes: all of them in one message, so one fix-and-rerun is enough."""
    with pytest.raises(SystemExit):
        main(["run", "--set", "dataset.path=missing.jsonl", "--set", "training.device=cuda",
              "--set", "adapter.target_modules=[nonexistent_proj]"])
    err = capfd.readouterr().err
    assert all(word in err for word in ("dataset.path", "training.device=cuda", "adapter.target_modules")), err


def test_debug_shows_the_traceback_and_keeps_the_exit_status(user_folder, capfd):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--debug", "--set", "adapter.r=0"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" in err and "ParameterError" in err and "adapter.r" in err


def test_an_unreachable_prefect_api_is_named(user_folder, capfd, monkeypatch):
    from servers import free_port

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--set", "training.steps=1"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and "PREFECT_API_URL=" in err and "no Prefect API answers" in err, err


def test_a_parameter_mistake_is_told_before_prefect_and_transformers_are_imported(tmp_path):
    """The commonest mistake (a key or a value the schema refuses) is answered from the parameters alone: the CLI
    validates them before importing the pipeline (Prefect, transformers: ~8 s of imports on this VM)."""
    import subprocess
    import sys

    script = ("import sys\nfrom adapterflow.flows.cli import main\ntry:\n    main(['run', '--set', 'training.stepz=5'])\n"
              "except SystemExit as exc:\n    print('exit', exc.code)\n"
              "print('loaded', sorted(m for m in ('prefect', 'transformers', 'mlflow') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "did you mean training.steps?" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.splitlines()[-2:] == ["exit 2", "loaded []"]
    assert list(tmp_path.iterdir()) == []  # nothing written
