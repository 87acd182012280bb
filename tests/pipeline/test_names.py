"""Names checked before any work starts (flows/names.py): every bad name is a parameter error naming the
parameter and quoting the rule, the rules agree with MLflow's, huggingface_hub's and git's own validators, and
the derived registered model name is valid, readable, stable and unique per base model.

BAD_NAME_CASES is also imported by the CLI battery: (overrides for `adapterflow run --set`, a fragment of the
expected message)."""

import subprocess
import warnings

import pytest

from adapterflow.flows import names
from adapterflow.flows.cli import parse_parameters
from adapterflow.flows.names import (alias_problem, check_names, default_registered_model_name, experiment_problem,
                                     git_ref_problem, registered_model_name_problem)
from adapterflow.flows.parameters import CredentialInUrlWarning, SaveAdapterParameters

LONG_PATH = "/tmp/" + "/".join(["d" * 200] * 21)  # every part fits NAME_MAX, the whole exceeds PATH_MAX (4096)
LOGGED_MODEL = "LoggedModel names may not contain / : . %"

BAD_NAME_CASES = [
    (["mlflow.registered_model_name=team/adapter"], LOGGED_MODEL),
    (["mlflow.registered_model_name=team.adapter-v1.2"], LOGGED_MODEL),
    (["mlflow.registered_model_name=my:model"], LOGGED_MODEL),
    (["mlflow.registered_model_name=50%-lora"], LOGGED_MODEL),
    (["mlflow.registered_model_name=\"it's-mine\""], LOGGED_MODEL),
    (["mlflow.registered_model_name=' '"], "MLflow model names must not be empty or blank"),
    (["mlflow.registered_model_name=" + "m" * 300], "MLflow stores model names in 256 characters"),
    (["mlflow.experiment=" + "e" * 300], "MLflow stores experiment names in 256 characters"),
    (["mlflow.experiment='  '"], "MLflow experiment names must not be empty or blank"),
    (["mlflow.alias=latest"], "MLflow reserves the alias 'latest' and version aliases v<N>"),
    (["mlflow.alias=v3"], "MLflow reserves the alias 'latest' and version aliases v<N>"),
    (["mlflow.alias=my alias"], "MLflow alias names may only contain letters, digits, underscores"),
    (["hub.repo_id='not a valid id!!'"], "huggingface_hub validate_repo_id refuses it"),
    (["hub.repo_id=org/team/adapter"], "huggingface_hub validate_repo_id refuses it"),
    (["hub.repo_id=me/lora--v2"], "huggingface_hub validate_repo_id refuses it: Cannot have -- or .."),
    (["hub.repo_id=me/" + "r" * 100], "the maximum length is 96"),
    (["hub.revision=my branch"], "Hub branch and tag names follow git check-ref-format"),
    (["hub.revision=refs/pr/1"], "give a plain branch or tag name, not a full ref or a commit id"),
    (["hub.tag=v1..2"], "Hub branch and tag names follow git check-ref-format"),
    (["hub.tag=release.lock"], "Hub branch and tag names follow git check-ref-format"),
    (["adapter.name=" + "a" * 230], "folder names may have at most"),
    (["run_name=" + "r" * 230], "folder names may have at most"),
    (["save.output_dir=/tmp/" + "o" * 230], "(NAME_MAX minus 40 for staging names)"),
    (["save.output_dir=" + LONG_PATH], "PATH_MAX"),
    (["runs_root=" + LONG_PATH], "PATH_MAX"),
]


@pytest.mark.parametrize("overrides, fragment", BAD_NAME_CASES, ids=lambda v: str(v)[:50])
def test_bad_names_are_parameter_errors(overrides, fragment):
    with pytest.raises(SystemExit) as error:
        parse_parameters(None, overrides)
    message = str(error.value)
    assert fragment in message
    param = overrides[0].split("=", 1)[0]
    line = next(line for line in message.splitlines() if fragment in line)
    assert param in line and "; " in line  # names the parameter, the rule, then the fix


def test_good_names_pass():
    params = parse_parameters(None, ["mlflow.registered_model_name=team-adapter_v2", "mlflow.alias=candidate",
                                     "mlflow.experiment=team/experiments 2026", "hub.repo_id=me/tiny.lora-v1",
                                     "hub.revision=exp/lr-3e-3", "hub.tag=v1.0", "run_name=run.1",
                                     "adapter.name=task_a"])
    assert check_names(params) == [] and params.hub.tag == "v1.0"
    assert check_names(SaveAdapterParameters()) == []


def test_a_long_output_dir_found_by_check_names(tmp_path):
    params = SaveAdapterParameters(runs_root=str(tmp_path))
    params.save.output_dir = LONG_PATH  # set after validation: check_names alone must find it
    assert [line.split("=")[0] for line in check_names(params)] == ["save.output_dir"]
    assert "PATH_MAX of 4096" in check_names(params)[0]


def test_new_version_suffix_counts_towards_the_name_limit(tmp_path):
    name = "o" * (215 - 3)  # fits alone; "-v9999" does not
    assert check_names(SaveAdapterParameters(runs_root=str(tmp_path), save={"output_dir": str(tmp_path / name)})) == []
    with pytest.raises(ValueError, match="save.output_dir"):
        SaveAdapterParameters(runs_root=str(tmp_path), save={"output_dir": str(tmp_path / name),
                                                             "if_exists": "new_version"})


SAMPLE_NAMES = ["default-tiny-llama", "team/adapter", "team.adapter", "a:b", "50%", "it's", 'say "hi"', " ", "",
                "ok name with spaces", "ünïcode-ok", "..", "a" * 256, "a" * 257, "x--y", "x_y-z"]


def _mlflow_accepts(validator, name) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        validator(name)
        return True
    except MlflowException:
        return False


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_registered_model_rule_is_mlflows_two_rules(name):
    from mlflow.utils.validation import _validate_logged_model_name, _validate_model_name

    mlflow_ok = _mlflow_accepts(_validate_model_name, name) and _mlflow_accepts(_validate_logged_model_name, name)
    assert (registered_model_name_problem(name) is None) == (mlflow_ok and len(name) <= 256)


@pytest.mark.parametrize("label", ["rational-inchworm", "my.run.v2", "a:b/c%d", "", None, "x" * 300])
def test_logged_model_and_run_names_stay_valid(label):
    """The per-run names built from the flow run's name: MLflow accepts them, and they differ between runs."""
    from mlflow.utils.validation import _validate_logged_model_name

    from adapterflow.flows.names import logged_model_name, mlflow_run_name

    names = {logged_model_name("d" * 250, label, run_id) for run_id in ("3f2a9c1d-aaaa", "77e01b2c-bbbb")}
    assert len(names) == 2
    for name in names:
        assert _mlflow_accepts(_validate_logged_model_name, name) and len(name) <= 256
        assert registered_model_name_problem(name) is None
    run_name = mlflow_run_name(label or "", "pissa r8")
    assert len(run_name) <= 250 and run_name.endswith("pissa r8")


@pytest.mark.parametrize("name", ["candidate", "champion_2", "latest", "LATEST", "v3", "V12", "v1a", "my alias",
                                  "a.b", "", "a" * 255, "a" * 256, "ünï"])
def test_alias_rule_is_mlflows(name):
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    mlflow_ok = _mlflow_accepts(_validate_model_alias_name, name) and _mlflow_accepts(
        _validate_model_alias_name_reserved, name)
    assert (alias_problem(name) is None) == mlflow_ok


@pytest.mark.parametrize("name", ["adapterflow", "/Users/me/exp", "e" * 256, "e" * 257, "e" * 501])
def test_experiment_rule_is_at_least_as_strict_as_mlflows(name):
    from mlflow.utils.validation import _validate_experiment_name

    assert (experiment_problem(name) is None) == (_mlflow_accepts(_validate_experiment_name, name) and len(name) <= 256)


REFS = ["main", "v1", "v1.0", "exp/lr-3e-3", "my branch", "a..b", "a.lock", ".hidden", "a/.b", "a/", "/a", "a//b",
        "a.", "@", "a@{b", "a~1", "a^", "a:b", "a?", "a*", "a[b", "a\\b", "tab\there", "ok@x", "release-2026.11"]


@pytest.mark.parametrize("ref", REFS)
def test_git_ref_rule_agrees_with_git(ref):
    git = subprocess.run(["git", "check-ref-format", f"refs/heads/{ref}"], capture_output=True)
    git_ok = git.returncode == 0 and ref != "@"  # also refused here: git reads a lone "@" as HEAD
    assert (git_ref_problem(ref, "hub.revision") is None) == git_ok


BASES = ["builtin:tiny-llama", "tiny-llama", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2_5-0_5B", "qwen/Qwen2.5-0.5B",
         "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3_2-1B", "openai-community/gpt2", "gpt2",
         "/models/Qwen2.5-0.5B-Instruct", "/other/Qwen2.5-0.5B-Instruct", "http://host/models/Qwen2.5-0.5B",
         "org/" + "x" * 90, "org/" + "x" * 91]


def test_derived_names_are_valid_readable_stable_and_unique():
    derived = {base: default_registered_model_name("default", base) for base in BASES}
    assert len(set(derived.values())) == len(BASES)  # two base models never share a name
    assert derived == {base: default_registered_model_name("default", base) for base in BASES}  # stable
    assert all(registered_model_name_problem(name) is None and len(name) <= 129 for name in derived.values())
    assert derived["builtin:tiny-llama"] == "default-tiny-llama"
    assert derived["openai-community/gpt2"] == "default-openai-community--gpt2"  # lossless: no hash
    assert derived["Qwen/Qwen2.5-0.5B"].startswith("default-Qwen--Qwen2_5-0_5B-")
    assert derived["meta-llama/Llama-3.2-1B"].startswith("default-meta-llama--Llama-3_2-1B-")
    assert derived["/models/Qwen2.5-0.5B-Instruct"].startswith("default-Qwen2_5-0_5B-Instruct-")
    assert len(derived["Qwen/Qwen2.5-0.5B"]) == len("default-Qwen--Qwen2_5-0_5B-") + names.HASH_CHARS


def test_derived_name_of_a_relative_local_folder_is_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "Qwen2.5-0.5B-Instruct").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = default_registered_model_name("default", "Qwen2.5-0.5B-Instruct")
    assert relative == default_registered_model_name("default", str(tmp_path / "Qwen2.5-0.5B-Instruct"))


def test_derived_names_register_in_real_mlflow(tmp_path):
    """The derived names go through MLflow itself: registered model and LoggedModel of that name."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("names", (tmp_path / "artifacts").as_uri())
    for base in ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "/models/Qwen2.5-0.5B-Instruct"):
        name = default_registered_model_name("default", base)
        client.create_registered_model(name)
        assert client.create_logged_model(experiment, name).name == name


def test_url_with_a_password_warns_without_showing_it():
    with pytest.warns(CredentialInUrlWarning) as caught:
        params = parse_parameters(None, ["mlflow.tracking_uri=http://me:pw-0123456789@127.0.0.1:5000",
                                         "hub.endpoint=https://me:hub-pw-0123456789@hub.example"])
    text = "\n".join(str(w.message) for w in caught)
    assert "mlflow.tracking_uri='http://me:***@127.0.0.1:5000'" in text and "MLFLOW_TRACKING_PASSWORD" in text
    assert "hub.endpoint=" in text and "basic auth instead of the HF token" in text
    assert "pw-0123456789" not in text and params.mlflow.tracking_uri.endswith("@127.0.0.1:5000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_parameters(None, ["mlflow.tracking_uri=http://127.0.0.1:5000"])  # no password: no warning


def test_parameter_errors_do_not_echo_url_passwords():
    with pytest.raises(SystemExit) as error, pytest.warns(CredentialInUrlWarning):
        parse_parameters(None, ["mlflow.tracking_uri=http://me:pw-0123456789@h", "save.output_dir=" + LONG_PATH])
    assert "PATH_MAX" in str(error.value) and "pw-0123456789" not in str(error.value)
