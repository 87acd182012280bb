"""adapterflow.integrations.hub and AdapterModel.push_to_hub, driven through the real huggingface_hub client against the local
fake Hub (`hub_server.py`): round trip, model card, idempotency, branch + tag, retries, permanent errors,
timeouts, and that the token never leaks."""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # conftest sets the same, before huggingface_hub is imported
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import logging  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import ModelCard, constants, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402
from huggingface_hub.utils import _http  # noqa: E402

from adapterflow import AdapterModel, LoraConfig, get_adapter_model  # noqa: E402
from adapterflow.manifest import verify_manifest  # noqa: E402
from adapterflow.integrations.hub import (  # noqa: E402
    HubPushError,
    HubPushPermanentError,
    HubPushTimeout,
    HubPushTransientError,
    PushResult,
    build_model_card,
    is_transient_hub_error,
    push_adapter_folder,
)
from hub_server import HubServer  # noqa: E402
from tiny import logits, randomize_adapters  # noqa: E402

TOKEN = "hf_adapterflow_secret_0123456789"
WRONG = "hf_wrong_secret_9876543210"
TRAINING = {"steps": 8, "final_loss": 1.25, "eval_loss_before": 2.5, "eval_loss_after": 1.5, "losses": [2.0, 1.25]}

pytestmark = pytest.mark.usefixtures("isolated_hf_home")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub_root"), token=TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_hub(hub):
    hub.clear_faults()
    hub.clear_log()
    yield
    hub.clear_faults()


@pytest.fixture
def no_client_backoff(monkeypatch):
    """huggingface_hub's own retries (preupload, LFS) sleep 1, 2, 4, 8 s: make them instant."""
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture
def model(load_base):
    model = get_adapter_model(load_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))
    randomize_adapters(model)
    return model


def push(model, hub, repo_id, **kwargs):
    kwargs = {"token": TOKEN, "endpoint": hub.url, "retry_delay": 0.01, **kwargs}
    return model.push_to_hub(repo_id, **kwargs)


def count(hub, method, fragment, status=None):
    """Requests logged so far. The server logs a request after sending its response, so the client can return
    before the last entry is there: wait until the log has been still for 50 ms first."""
    deadline, seen = time.monotonic() + 2, -1
    while len(hub.requests) != seen and time.monotonic() < deadline:
        seen = len(hub.requests)
        time.sleep(0.05)
    return sum(m == method and fragment in p and status in (None, s) for m, p, s in hub.requests)


def assert_no_secret(error, *secrets):
    text = "".join(traceback.format_exception(error)) + repr(error) + str(error)
    assert error.__cause__ is None and error.__context__ is None  # the client's exception holds the request headers
    for secret in secrets:
        assert secret not in text


def test_push_round_trip_identical_files_and_logits(model, hub, load_base, input_ids, tmp_path):
    constants.HF_HUB_DISABLE_XET = False  # the push turns the LFS path on itself (this server has no Xet) ...
    try:
        result = push(model, hub, "tester/round-trip", commit_message="First adapter", tags=["demo"],
                      license="apache-2.0", datasets=["tester/instructions"], training=TRAINING, private=True,
                      timeout=42.0)
    finally:
        xet_after, constants.HF_HUB_DISABLE_XET = constants.HF_HUB_DISABLE_XET, True
    assert xet_after is True  # ... once per process, and the shared client carries the push's timeout
    assert _http.get_session().timeout.read == 42.0 and _http.get_session().follow_redirects
    commits = hub.commits("tester/round-trip")
    assert [c["title"] for c in commits] == ["First adapter", "initial commit"]
    assert result == PushResult("tester/round-trip", f"{hub.url}/tester/round-trip/commit/{commits[0]['oid']}",
                                commits[0]["oid"], "main", None, True)
    assert count(hub, "POST", "/commit/") == 1 and count(hub, "POST", "/api/validate-yaml", 200) >= 1

    local = tmp_path / "local"
    model.save_pretrained(local)
    downloaded = Path(snapshot_download("tester/round-trip", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c"))
    assert sorted(p.name for p in downloaded.iterdir()) == sorted([".gitattributes", *(p.name for p in local.iterdir())])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (downloaded / name).read_bytes() == (local / name).read_bytes()
    single = hf_hub_download("tester/round-trip", "adapter_model.safetensors", endpoint=hub.url, token=TOKEN,
                             cache_dir=tmp_path / "c2")
    assert Path(single).read_bytes() == (local / "adapter_model.safetensors").read_bytes()

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_base(), downloaded)
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), rtol=0, atol=0)
    # The pushed card replaced the saved one: the pushed manifest describes what was pushed.
    assert verify_manifest(downloaded) == [] and (downloaded / "README.md").read_bytes() != (local / "README.md").read_bytes()
    ours = AdapterModel.from_pretrained(load_base(), downloaded)  # files and base checked against the manifest
    torch.testing.assert_close(logits(ours, input_ids), logits(model, input_ids), rtol=0, atol=0)

    card = ModelCard.load(downloaded / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["lora", "peft", "adapterflow", "demo"]
    assert card.data.license == "apache-2.0" and card.data.datasets == ["tester/instructions"]
    assert card.data.base_model is None  # the base is a local folder: not valid Hub metadata
    assert "`tiny-llama`" in card.text and "PeftModel.from_pretrained" in card.text
    assert "| default | 4 | 8 | q_proj, v_proj | True |" in card.text
    assert "| eval loss before training | 2.5000 |" in card.text and "| steps | 8 |" in card.text


def test_model_card_with_hub_base_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    text = build_model_card(tmp_path, base_model="meta-llama/Llama-3.2-1B", tags=["lora", "x"])
    data = ModelCard(text).data
    assert data.base_model == "meta-llama/Llama-3.2-1B" and data.license is None and data.datasets is None
    assert data.tags == ["lora", "peft", "adapterflow", "x", "base_model:adapter:meta-llama/Llama-3.2-1B"]
    assert '"meta-llama/Llama-3.2-1B"' in text and "## Training" not in text
    for local in (str(tmp_path), "./models/base", "builtin:tiny-llama"):
        assert ModelCard(build_model_card(tmp_path, base_model=local)).data.base_model is None
    with pytest.raises(FileNotFoundError):
        build_model_card(tmp_path / "nothing")


def test_identical_repush_makes_no_commit(model, hub):
    first = push(model, hub, "tester/idempotent", tag="v1")
    before = len(hub.commits("tester/idempotent"))
    count(hub, "POST", "")  # let the first push's last log entry land before clearing the log
    hub.clear_log()
    again = push(model, hub, "tester/idempotent", tag="v1")  # the tag already points at this commit: fine
    assert again.commit_oid == first.commit_oid and again.created_commit is False and first.created_commit
    assert len(hub.commits("tester/idempotent")) == before
    assert count(hub, "POST", "/commit/") == 0 and count(hub, "PUT", "/_lfs/") == 0


def test_branch_and_tag(model, hub):
    result = push(model, hub, "tester/branched", revision="dev", tag="v1")
    refs = hub.refs("tester/branched")
    assert result.revision == "dev" and result.tag == "v1" and result.created_commit
    assert refs["branches"]["dev"] == refs["tags"]["v1"] == result.commit_oid
    assert [c["title"] for c in hub.commits("tester/branched")] == ["initial commit"]  # main untouched
    assert hub.file_bytes("tester/branched", "adapter_config.json", revision="v1")
    randomize_adapters(model, seed=1)
    with pytest.raises(HubPushError) as err:  # new files, same tag: the tag is not moved
        push(model, hub, "tester/branched", revision="dev", tag="v1")
    assert err.value.status == 409 and not err.value.transient and "never moved" in str(err.value)
    assert hub.refs("tester/branched")["tags"]["v1"] == result.commit_oid


def test_other_weights_format_replaces_the_stale_file(model, hub):
    push(model, hub, "tester/formats")
    push(model, hub, "tester/formats", safe_serialization=False)
    files = set(hub.commits("tester/formats")[0]["files"])
    assert files == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.bin",
                     "adapterflow.json"}


def test_503_on_commit_and_create_repo_are_retried(model, hub, no_client_backoff, caplog):
    caplog.set_level(logging.WARNING, logger="adapterflow.integrations.hub")
    hub.add_fault("POST", r"/api/repos/create", status=503, message="Hub is busy")  # not retried by the client
    hub.add_fault("POST", r"/commit/", status=503, message="Commit service unavailable")
    result = push(model, hub, "tester/flaky")
    assert count(hub, "POST", "/api/repos/create", 503) == 1 and count(hub, "POST", "/api/repos/create", 200) == 1
    assert count(hub, "POST", "/commit/", 503) == 1 and count(hub, "POST", "/commit/", 200) == 1
    assert count(hub, "GET", "/revision/main") == 2  # our loop re-read the head before the second upload
    assert result.created_commit and len(hub.commits("tester/flaky")) == 2
    assert "attempt 1/3" in caplog.text and "HTTP 503" in caplog.text


def test_503_on_preupload_is_retried(model, hub, no_client_backoff):
    hub.add_fault("POST", r"/preupload/", status=503, count=7)  # more than the client's own 1 + 5 tries
    result = push(model, hub, "tester/flaky-preupload")
    assert count(hub, "POST", "/preupload/", 503) == 7 and count(hub, "POST", "/preupload/", 200) == 1
    assert count(hub, "GET", "/revision/main") == 2 and result.created_commit  # our loop made the second try


def test_429_retry_after_is_honoured(model, hub, monkeypatch):
    import adapterflow.integrations.hub

    slept = []
    monkeypatch.setattr(adapterflow.integrations.hub, "time", types.SimpleNamespace(sleep=slept.append))
    hub.add_fault("POST", r"/api/repos/create", status=429, message="Slow down", headers={"Retry-After": "7"})
    assert push(model, hub, "tester/rate-limited").created_commit
    assert slept == [7.0] and count(hub, "POST", "/api/repos/create", 429) == 1


def test_transient_errors_give_up_after_max_attempts(model, hub):
    hub.add_fault("POST", r"/api/repos/create", status=502, count=None)
    with pytest.raises(HubPushError) as err:
        push(model, hub, "tester/down", max_attempts=2)
    assert err.value.status == 502 and err.value.transient and is_transient_hub_error(err.value)
    assert count(hub, "POST", "/api/repos/create") == 2


def test_wrong_token_fails_at_once(model, hub):
    start = time.monotonic()
    with pytest.raises(HubPushError) as err:
        push(model, hub, "tester/not-mine", token=WRONG)
    assert time.monotonic() - start < 5
    assert err.value.status == 401 and not err.value.transient and not is_transient_hub_error(err.value)
    assert "HF_TOKEN" in str(err.value) and "write scope" in str(err.value)
    assert count(hub, "POST", "/api/repos/create") == 1 and count(hub, "POST", "/preupload/") == 0
    assert_no_secret(err.value, WRONG, TOKEN)


@pytest.mark.parametrize("status, path, fix", [
    (403, r"/api/repos/create", "lacks write access to tester/refused"),
    (403, r"/preupload/", "lacks write access to tester/refused"),
    (404, r"/preupload/", "check repo_id 'tester/refused'"),
])
def test_403_and_404_fail_at_once(model, hub, status, path, fix):
    hub.add_fault("POST", path, status=status, message=f"refused; you sent {TOKEN}")  # a server echoing the token
    with pytest.raises(HubPushError) as err:
        push(model, hub, "tester/refused")
    assert err.value.status == status and not err.value.transient and fix in str(err.value)
    assert "***" in str(err.value) and count(hub, "POST", path) == 1  # one attempt: a retry would have succeeded
    assert_no_secret(err.value, TOKEN)


def test_pull_request_refused_by_this_hub(model, hub):
    with pytest.raises(HubPushError) as err:
        push(model, hub, "tester/pr", create_pr=True)
    assert err.value.status == 400 and not err.value.transient
    with pytest.raises(ValueError, match="create_pr"):
        push(model, hub, "tester/pr", create_pr=True, revision="dev")


def test_stalled_commit_times_out(model, hub):
    push(model, hub, "tester/stalled", commit_message="first")
    randomize_adapters(model, seed=2)
    hub.add_fault("POST", r"/commit/", status=None, delay=1.5)
    start = time.monotonic()
    with pytest.raises(HubPushTimeout) as err:
        push(model, hub, "tester/stalled", timeout=0.4, max_attempts=1, commit_message="second")
    assert time.monotonic() - start < 0.4 + 1.0  # the other requests of the push are quick
    assert isinstance(err.value, TimeoutError) and err.value.transient and err.value.status is None
    assert "timed out" in str(err.value) and err.value.step == "upload"
    assert_no_secret(err.value, TOKEN)
    deadline = time.monotonic() + 5  # the Hub still applies the stalled commit; pushing again is then a no-op
    while len(hub.commits("tester/stalled")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    again = push(model, hub, "tester/stalled", commit_message="second")
    assert not again.created_commit and [c["title"] for c in hub.commits("tester/stalled")][:2] == ["second", "first"]


def test_stalled_commit_retried_makes_one_commit(model, hub):
    hub.add_fault("POST", r"/commit/", status=None, delay=1.0)
    result = push(model, hub, "tester/stalled-retry", timeout=0.4, retry_delay=0)
    deadline = time.monotonic() + 5  # wait for the stalled request: parentCommit is stale now, so the Hub says 412
    while count(hub, "POST", "/commit/") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(hub, "POST", "/commit/") == 2 and count(hub, "POST", "/commit/", 412) == 1
    assert result.created_commit and len(hub.commits("tester/stalled-retry")) == 2  # one commit, not two


def test_token_appears_nowhere(model, hub, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # the client then logs every request as a curl command
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    result = push(model, hub, "tester/secret", training=TRAINING, tag="v1")
    with pytest.raises(HubPushError) as err:
        push(model, hub, "tester/secret", token=WRONG)
    assert "Request" in caplog.text and "curl" in caplog.text  # the debug logging did run
    for text in (caplog.text, repr(result), str(result), repr(err.value)):
        assert TOKEN not in text and WRONG not in text
    stored = [p for p in hub.store.root.rglob("*") if p.is_file()]
    assert stored and not any(TOKEN.encode() in p.read_bytes() for p in stored)  # blobs, commits, refs
    leaky = tmp_path / "leaky"
    model.save_pretrained(leaky)
    (leaky / "notes.txt").write_text(f"token={TOKEN}\n")
    with pytest.raises(HubPushError, match="contains the Hub token") as err:
        push_adapter_folder(leaky, "tester/secret", token=TOKEN, endpoint=hub.url)
    assert TOKEN not in str(err.value) and not err.value.transient


def test_token_and_endpoint_from_environment(model, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = model.push_to_hub("from-env", retry_delay=0)  # no namespace: the token owner's
    assert result.repo_id == "tester/from-env" and result.commit_url.startswith(hub.url)


def test_unknown_push_to_hub_argument(model):
    with pytest.raises(TypeError, match="max_shard_size"):
        model.push_to_hub("tester/x", max_shard_size="5GB")


def test_error_classification_and_pickling():
    request = httpx2.Request("POST", "http://hub/api/repos/create")

    def http_error(status):
        return HfHubHTTPError("boom", response=httpx2.Response(status, request=request))

    assert [is_transient_hub_error(http_error(s)) for s in (500, 503, 408, 429, 412, 401, 403, 404, 409)] == [
        True, True, True, True, True, False, False, False, False]
    assert is_transient_hub_error(httpx2.ReadTimeout("slow", request=request))
    assert is_transient_hub_error(httpx2.ConnectError("refused", request=request))
    assert not is_transient_hub_error(ValueError("Invalid metadata in README.md"))
    for error in (HubPushTransientError("x", status=503, repo_id="a/b", step="upload"),
                  HubPushTimeout("y", repo_id="a/b", step="upload"),
                  HubPushPermanentError("z", status=401, repo_id="a/b", step="create repo")):
        copy = pickle.loads(pickle.dumps(error))  # Prefect keeps exceptions in task states
        assert (type(copy), str(copy), copy.status, copy.transient, copy.repo_id, copy.step) == (
            type(error), str(error), error.status, error.transient, error.repo_id, error.step)
        assert isinstance(copy, HubPushError) and is_transient_hub_error(copy) is error.transient


def test_pipeline_retry_policy_agrees_with_transient(model, hub):
    """tasks.retries.is_transient knows nothing of HubPushError; the error's second base class tells it."""
    is_transient = pytest.importorskip("adapterflow.tasks.retries").is_transient
    errors = []
    for fault, kwargs in (({"status": 503}, {"max_attempts": 1}), ({"status": None, "delay": 0.6}, {"timeout": 0.2}),
                          (None, {"token": WRONG})):
        if fault:
            hub.add_fault("POST", r"/api/repos/create", **fault)
        with pytest.raises(HubPushError) as err:
            push(model, hub, "tester/policy", **{"max_attempts": 1, **kwargs})
        errors.append(err.value)
    assert [type(e) for e in errors] == [HubPushTransientError, HubPushTimeout, HubPushPermanentError]
    assert [is_transient(e) for e in errors] == [e.transient for e in errors] == [True, True, False]


def test_import_adapterflow_does_not_import_the_hub_client():
    code = ("import sys, adapterflow, adapterflow.integrations.hub, adapterflow.model; "
            "print(sorted(m for m in ('huggingface_hub', 'httpx2', 'prefect', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_folder_that_is_no_saved_adapter_is_refused_before_any_request(hub, tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json .*not a saved adapter folder"):
        push_adapter_folder(tmp_path, "tester/not-an-adapter", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_a_folder_whose_files_no_longer_match_its_manifest_is_refused_before_any_request(model, hub, tmp_path):
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(HubPushPermanentError, match=r"Not pushing: .*manifest(.|\n)*adapter_model.safetensors: sha256 "
                                                    r"(.|\n)*Save the adapter again") as info:
        push_adapter_folder(tmp_path / "adapter", "tester/tampered", token=TOKEN, endpoint=hub.url)
    assert info.value.step == "check folder" and info.value.transient is False
    assert hub.requests == []
    model.save_pretrained(tmp_path / "adapter")  # saved again: the push goes through
    assert push_adapter_folder(tmp_path / "adapter", "tester/tampered", token=TOKEN, endpoint=hub.url).created_commit
