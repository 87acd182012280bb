"""The fake Hub (`hub_server.py`) driven by the real huggingface_hub client on its classic (non-Xet) LFS path."""

import os

# Read by huggingface_hub at import time (conftest sets the same values when it runs first).
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx2  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http, set_client_factory  # noqa: E402
from huggingface_hub.utils.sha import git_hash  # noqa: E402

from hub_server import HubServer  # noqa: E402

TOKEN = "hf_test_token_0123456789"
README = "---\nlicense: apache-2.0\nlibrary_name: peft\ntags:\n- lora\n---\n\n# Tiny LoRA adapter\n"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}

pytestmark = pytest.mark.usefixtures("isolated_hf_home")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub_root"), token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture(autouse=True)
def no_leftover_faults(hub):
    yield
    hub.clear_faults()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """README with front matter, adapter_config.json and a ~1 MB adapter_model.safetensors."""
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "README.md").write_text(README)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(1 << 20))
    return folder


def push(api: HfApi, folder: Path, name: str, **kwargs):
    """Create `tester/<name>` and upload `folder` to it; return (repo_id, CommitInfo)."""
    repo_id = api.create_repo(f"tester/{name}", private=True, exist_ok=True).repo_id
    return repo_id, api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Push {name}", **kwargs)


def count(hub: HubServer, method: str, fragment: str, status: int | None = None) -> int:
    return sum(m == method and fragment in p and status in (None, s) for m, p, s in hub.requests)


@pytest.fixture(scope="module")
def pushed(api, hub, adapter_dir):
    hub.clear_log()
    repo_id, info = push(api, adapter_dir, "adapter")
    return repo_id, info, list(hub.requests)


def test_whoami(api):
    assert api.whoami()["name"] == "tester"


def test_create_repo_private_and_exist_ok(api, hub):
    url = api.create_repo("tester/fresh", private=True)
    assert url.repo_id == "tester/fresh" and url.startswith(hub.url)
    assert api.create_repo("tester/fresh", private=True, exist_ok=True).repo_id == "tester/fresh"
    assert api.create_repo("fresh", exist_ok=True).repo_id == "tester/fresh"  # default namespace is the user
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("tester/fresh")
    assert err.value.response.status_code == 409
    assert api.repo_info("tester/fresh").private is True
    assert [c["title"] for c in hub.commits("tester/fresh")] == ["initial commit"]
    assert api.list_repo_files("tester/fresh") == [".gitattributes"]
    # Dataset repos live apart from model repos of the same name; spaces are not served.
    assert api.create_repo("tester/fresh", repo_type="dataset").startswith(f"{hub.url}/datasets/tester/fresh")
    assert api.repo_info("tester/fresh", repo_type="dataset").private is False
    assert [c["title"] for c in hub.commits("datasets/tester/fresh")] == ["initial commit"]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("tester/space", repo_type="space", space_sdk="static")
    assert err.value.response.status_code == 400


def test_upload_folder_is_one_lfs_commit(hub, adapter_dir, pushed):
    repo_id, info, log = pushed
    commits = hub.commits(repo_id)
    assert [c["title"] for c in commits] == ["Push adapter", "initial commit"]
    assert info.oid == commits[0]["oid"] and info.repo_url.repo_id == repo_id
    files = commits[0]["files"]
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert files["adapter_model.safetensors"]["lfs"] and not files["adapter_config.json"]["lfs"]
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        assert hub.file_bytes(repo_id, name) == (adapter_dir / name).read_bytes()
    assert sum(m == "POST" and "/commit/" in p for m, p, _ in log) == 1
    assert sum(m == "PUT" and "/_lfs/" in p for m, p, _ in log) == 1  # only the safetensors travels over LFS
    assert all(status < 400 for _, _, status in log), log


def test_listing_tree_and_paths_info(api, adapter_dir, pushed):
    repo_id, info, _ = pushed
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    config = (adapter_dir / "adapter_config.json").read_bytes()
    assert api.list_repo_files(repo_id) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True, expand=True)}
    assert tree["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert tree["adapter_model.safetensors"].size == len(weights)
    assert tree["adapter_config.json"].blob_id == git_hash(config) and tree["adapter_config.json"].lfs is None
    assert tree["adapter_config.json"].last_commit.oid == info.oid
    assert tree[".gitattributes"].last_commit.title == "initial commit"
    found = api.get_paths_info(repo_id, ["adapter_config.json", "missing.txt"], expand=False)
    assert [(f.path, f.blob_id) for f in found] == [("adapter_config.json", git_hash(config))]
    siblings = {s.rfilename: s for s in api.model_info(repo_id, files_metadata=True).siblings}
    assert siblings["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()


def test_tree_of_subfolder(api, hub, tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "sub" / "deep" / "b.txt").write_text("b")
    repo_id, _ = push(api, tmp_path, "nested")
    shallow = {(e.path, type(e).__name__) for e in api.list_repo_tree(repo_id, "sub")}
    assert shallow == {("sub/a.txt", "RepoFile"), ("sub/deep", "RepoFolder")}
    assert "sub/deep/b.txt" in api.list_repo_files(repo_id)
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(repo_id, "nope"))


def test_downloads_are_byte_identical(api, hub, adapter_dir, pushed, tmp_path):
    repo_id, info, _ = pushed
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        local = hf_hub_download(repo_id, name, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
        assert Path(local).read_bytes() == (adapter_dir / name).read_bytes()
    snapshot = Path(snapshot_download(repo_id, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "snap"))
    assert snapshot.name == info.oid
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        assert (snapshot / name).read_bytes() == (adapter_dir / name).read_bytes()
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "nope.bin", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "README.md", revision="no-such-branch", endpoint=hub.url, token=TOKEN,
                        cache_dir=tmp_path / "cache")


def test_resolve_headers_and_range(hub, adapter_dir, pushed):
    repo_id, info, _ = pushed
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    url = f"{hub.url}/{repo_id}/resolve/main/adapter_model.safetensors"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    head = httpx2.head(url, headers=auth)
    assert head.headers["X-Repo-Commit"] == info.oid
    assert head.headers["ETag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert int(head.headers["Content-Length"]) == len(weights) and head.content == b""
    part = httpx2.get(url, headers={**auth, "Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == weights[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(weights)}"
    assert httpx2.get(url, headers={**auth, "Range": "bytes=-10"}).content == weights[-10:]
    assert httpx2.get(url, headers={**auth, "Range": f"bytes={len(weights)}-"}).status_code == 416
    missing = httpx2.head(url.replace("adapter_model", "nothing"), headers=auth)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


def test_identical_repush_makes_no_commit(api, hub, adapter_dir, pushed):
    repo_id, info, _ = pushed
    before = len(hub.commits(repo_id))
    hub.clear_log()
    again = api.upload_folder(repo_id=repo_id, folder_path=adapter_dir, commit_message="Push again")
    assert again.oid == info.oid
    assert len(hub.commits(repo_id)) == before
    assert count(hub, "POST", "/commit/") == 0 and count(hub, "PUT", "/_lfs/") == 0


def test_tag_and_download_at_tag(api, hub, adapter_dir, tmp_path):
    repo_id, first = push(api, adapter_dir, "tagged")
    api.create_tag(repo_id, tag="v1")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(repo_id, tag="v1")
    assert err.value.response.status_code == 409
    api.create_tag(repo_id, tag="v1", exist_ok=True)
    second = api.upload_file(repo_id=repo_id, path_or_fileobj=b'{"r": 8}', path_in_repo="adapter_config.json")
    assert second.oid != first.oid
    old = hf_hub_download(repo_id, "adapter_config.json", revision="v1", endpoint=hub.url, token=TOKEN,
                          cache_dir=tmp_path)
    new = hf_hub_download(repo_id, "adapter_config.json", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path)
    assert Path(old).read_bytes() == (adapter_dir / "adapter_config.json").read_bytes()
    assert Path(new).read_bytes() == b'{"r": 8}'
    assert hub.file_bytes(repo_id, "adapter_config.json", revision=first.oid) == Path(old).read_bytes()
    assert api.repo_info(repo_id, revision="v1").sha == first.oid


def test_branch_upload_and_refs(api, hub, adapter_dir):
    repo_id, first = push(api, adapter_dir, "branched")
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    on_dev = api.upload_file(repo_id=repo_id, path_or_fileobj=b"dev notes", path_in_repo="NOTES.md", revision="dev")
    assert hub.file_bytes(repo_id, "NOTES.md", revision="dev") == b"dev notes"
    assert "NOTES.md" not in api.list_repo_files(repo_id)
    assert "NOTES.md" in api.list_repo_files(repo_id, revision="dev")
    api.create_tag(repo_id, tag="release", revision="dev")
    refs = api.list_repo_refs(repo_id)
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", first.oid), ("dev", on_dev.oid)}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("release", "refs/tags/release", on_dev.oid)]
    assert hub.refs(repo_id) == {"branches": {"main": first.oid, "dev": on_dev.oid}, "tags": {"release": on_dev.oid}}
    assert hub.commits(repo_id, "dev")[1]["oid"] == first.oid
    assert [c.commit_id for c in api.list_repo_commits(repo_id, revision="dev")][:2] == [on_dev.oid, first.oid]


def test_delete_and_stale_parent_commit(api, hub, adapter_dir):
    repo_id, first = push(api, adapter_dir, "deleting")
    api.upload_file(repo_id=repo_id, path_or_fileobj=b"x", path_in_repo="extra/x.txt")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(repo_id=repo_id, path_or_fileobj=b"y", path_in_repo="y.txt", parent_commit=first.oid)
    assert err.value.response.status_code == 412
    api.delete_folder("extra", repo_id=repo_id)
    api.delete_file("README.md", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes", "adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("README.md", repo_id=repo_id)


def test_preupload_and_lfs_503_are_retried(api, hub, adapter_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))  # no backoff waits
    adapter_dir = Path(shutil.copytree(adapter_dir, tmp_path / "fresh"))
    (adapter_dir / "adapter_model.safetensors").write_bytes(os.urandom(1 << 20))  # new bytes: the LFS PUT happens
    repo_id = api.create_repo("tester/flaky", exist_ok=True).repo_id
    hub.add_fault("POST", r"/preupload/", status=503, count=2, message="Hub is busy")
    hub.add_fault("PUT", r"/_lfs/", status=503, message="S3 is busy")  # answered before the body is read
    hub.clear_log()
    api.upload_folder(repo_id=repo_id, folder_path=adapter_dir)
    assert count(hub, "POST", "/preupload/", 503) == 2 and count(hub, "POST", "/preupload/", 200) == 1
    assert count(hub, "PUT", "/_lfs/", 503) == 1 and count(hub, "PUT", "/_lfs/", 200) == 1
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert hub.file_bytes(repo_id, "adapter_model.safetensors") == weights


def test_commit_503_is_not_retried(api, hub, adapter_dir):
    repo_id = api.create_repo("tester/commit-fails", exist_ok=True).repo_id
    hub.add_fault("POST", r"/commit/", status=503, message="Commit service unavailable")
    hub.clear_log()
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(repo_id=repo_id, folder_path=adapter_dir)
    assert err.value.response.status_code == 503
    assert "Commit service unavailable" in str(err.value)
    assert count(hub, "POST", "/commit/") == 1
    assert len(hub.commits(repo_id)) == 1  # only the initial commit
    api.upload_folder(repo_id=repo_id, folder_path=adapter_dir)  # the fault was used up: now it works
    assert len(hub.commits(repo_id)) == 2


def test_commit_applied_although_client_timed_out(api, hub, adapter_dir):
    """A lost commit response: the client gives up, yet the Hub made the commit (retrying would duplicate it)."""
    repo_id = api.create_repo("tester/slow-commit", exist_ok=True).repo_id
    hub.add_fault("POST", r"/commit/", status=None, delay=1.0)
    set_client_factory(lambda: httpx2.Client(timeout=0.3, event_hooks={"request": [_http.hf_request_event_hook]}))
    try:
        with pytest.raises(httpx2.ReadTimeout):
            api.upload_folder(repo_id=repo_id, folder_path=adapter_dir, commit_message="slow")
    finally:
        set_client_factory(_http.default_client_factory)
    deadline = time.monotonic() + 5
    while len(hub.commits(repo_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c["title"] for c in hub.commits(repo_id)] == ["slow", "initial commit"]


def test_faults_over_http_and_delay(api, hub):
    spec = [{"method": "GET", "path": "/api/whoami", "status": 500, "count": 1, "message": "boom"}]
    request = urllib.request.Request(f"{hub.url}/_faults", data=json.dumps(spec).encode(), method="POST")
    with urllib.request.urlopen(request) as response:
        assert json.load(response)[0]["path_regex"] == "/api/whoami"
    with pytest.raises(HfHubHTTPError) as err:
        api.whoami()
    assert err.value.response.status_code == 500
    assert api.whoami()["name"] == "tester"
    hub.add_fault("GET", r"/api/whoami", status=None, delay=0.3)
    start = time.monotonic()
    assert api.whoami()["name"] == "tester"
    assert time.monotonic() - start >= 0.3
    hub.add_fault(None, r".", count=None)
    urllib.request.urlopen(urllib.request.Request(f"{hub.url}/_faults", method="DELETE")).close()
    assert hub.faults == [] and api.whoami()["name"] == "tester"


def test_wrong_or_missing_token_is_401(api, hub, pushed):
    repo_id = pushed[0]
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").whoami()
    assert err.value.response.status_code == 401
    assert httpx2.get(f"{hub.url}/api/whoami-v2").status_code == 401  # no Authorization header at all
    for bad in (HfApi(endpoint=hub.url, token="hf_wrong"), HfApi(endpoint=hub.url, token=False)):
        with pytest.raises(HfHubHTTPError) as err:
            bad.create_repo("tester/not-mine")
        assert err.value.response.status_code == 401
        with pytest.raises(RepositoryNotFoundError):  # the 401 carries X-Error-Code: RepoNotFound
            bad.repo_info(repo_id)
    assert not api.repo_exists("tester/not-mine")


def test_token_never_logged(api, hub, pushed):
    api.whoami()
    api.list_repo_files(pushed[0])
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.url, token="hf_wrong_secret").whoami()
    with urllib.request.urlopen(f"{hub.url}/_log") as response:
        served = response.read().decode()
    assert "/api/whoami-v2" in served and hub.requests
    for secret in (TOKEN, "hf_wrong_secret", "Bearer"):
        assert secret not in served and secret not in repr(hub.requests)


@pytest.mark.parametrize("front_matter", ["license: [apache-2.0\n", "- just\n- a list\n"])
def test_invalid_readme_yaml_is_rejected(api, hub, adapter_dir, tmp_path, front_matter):
    shutil.copytree(adapter_dir, tmp_path / "bad")
    (tmp_path / "bad" / "README.md").write_text(f"---\n{front_matter}---\n# Adapter\n")
    repo_id = api.create_repo("tester/bad-card", exist_ok=True).repo_id
    hub.clear_log()
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "bad")
    assert count(hub, "POST", "/api/validate-yaml", 400) == 1 and count(hub, "POST", "/commit/") == 0


def test_pull_requests_are_refused(api, pushed):
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(repo_id=pushed[0], path_or_fileobj=b"pr", path_in_repo="pr.txt", create_pr=True)
    assert err.value.response.status_code == 400 and "not supported" in str(err.value)


def test_repos_survive_a_restart(api, hub, pushed):
    repo_id, info, _ = pushed
    with HubServer(hub.store.root, token=TOKEN) as second:
        assert second.url != hub.url
        again = HfApi(endpoint=second.url, token=TOKEN)
        assert again.repo_info(repo_id).sha == info.oid
    with pytest.raises(RuntimeError):
        second.url
    with pytest.raises(httpx2.TransportError):  # stopped means stopped, even for pooled keep-alive connections
        again.repo_info(repo_id)
