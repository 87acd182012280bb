"""HTTP side of the fake Hub in `hub_server.py`: routing, auth, faults, and one `route_*` method per Hub endpoint.

Request and response shapes follow what huggingface_hub 2.4.0 sends and reads (see `hf_api.py`, `_commit_api.py`,
`lfs.py` and `file_download.py` in the installed client). Routes are matched against the still-quoted path, because
the client quotes revisions with `safe=""` (`refs/pr/1` arrives as `refs%2Fpr%2F1`).
"""

from __future__ import annotations

import base64
import json
import re
import time
import traceback
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from hub_store import HubError, lfs_pointer, upload_mode  # tests/ is on sys.path (pytest rootdir imports)

if TYPE_CHECKING:
    from hub_server import HubServer

_API = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_GIT = r"/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)"
# (methods, path regex matched against the still-quoted path, handler method, needs the token)
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami", True),
    ("POST", r"/api/repos/create", "create_repo", True),
    ("DELETE", r"/api/repos/delete", "delete_repo", True),
    ("POST", r"/api/validate-yaml", "validate_yaml", True),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info", True),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree", True),
    ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info", True),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "preupload", True),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "commit", True),
    ("GET", _API + r"/commits/(?P<rev>[^/]+)", "list_commits", True),
    ("GET", _API + r"/refs", "refs", True),
    ("POST DELETE", _API + r"/(?P<kind>tag|branch)/(?P<rev>[^/]+)", "ref", True),
    ("POST", _GIT + r"\.git/info/lfs/objects/batch", "lfs_batch", True),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload", False),
    ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify", True),
    ("GET HEAD", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", True),
]
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def _flag(values: list[str] | None) -> bool:
    return bool(values) and values[0].lower() in ("1", "true")


class HubHandler(BaseHTTPRequestHandler):
    """One request: control routes, then faults, then auth, then the matching `route_*` method."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls
    hub: HubServer  # set on the per-server subclass

    def log_message(self, format, *args) -> None:  # noqa: A002 - the request log lives in HubServer.requests
        pass

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        self.status, self.body_state = 0, "unread"
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        control = self.control = split.path in ("/_faults", "/_log")
        try:
            try:
                if control:
                    self._control(method, split.path)
                else:
                    self._dispatch(method, split.path)
            except HubError as err:
                self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (e.g. it timed out)
            self.close_connection = True
        except Exception as exc:  # a bug in this server: report it to the client and the test output
            traceback.print_exc()
            if self.status:  # the response had started: all we can do is drop the connection
                self.close_connection = True
            else:
                self._send_error(HubError(500, f"Internal error in test Hub: {exc!r}"))
        finally:
            if not control and not self.status:  # no response was sent (the client went away)
                self.hub.log(method, self.path, 0)

    def _dispatch(self, method: str, path: str) -> None:
        """Injected fault, then route lookup, then auth, then the route handler."""
        fault = self.hub.take_fault(method, self.path)
        if fault is not None:
            time.sleep(fault.delay)
            if fault.status is not None:
                raise HubError(fault.status, fault.message, headers=fault.headers)
        handler, params, needs_auth = self._route(method, path)
        if needs_auth and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            code = "RepoNotFound" if "repo" in params else None
            raise HubError(401, "Invalid credentials in Authorization header", code)
        handler(params)

    def _route(self, method: str, path: str):
        for methods, pattern, name, needs_auth in ROUTES:
            match = re.fullmatch(pattern, path)
            if match and method in methods.split():
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                repo_type = params.pop("type", "models")
                if repo_type not in ("models", "datasets"):
                    raise HubError(400, "This test Hub only hosts model and dataset repos")
                if "repo" in params:  # the store's key: "ns/name" for a model, "datasets/ns/name" for a dataset
                    params["key"] = params["repo"] if repo_type == "models" else f"datasets/{params['repo']}"
                    params["url_prefix"] = "" if repo_type == "models" else "datasets/"
                return getattr(self, f"route_{name}"), params, needs_auth
        raise HubError(404, f"No route for {method} {path}")

    # ---- request bodies ----------------------------------------------------------------------------------------
    def _chunks(self):
        """Yield the request body (Content-Length or chunked), reading it from the socket once."""
        if self.body_state != "unread":
            return
        self.body_state = "reading"
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionResetError("client closed the connection mid-body")
                remaining -= len(chunk)
                yield chunk
        self.body_state = "done"

    def _body(self) -> bytes:
        return b"".join(self._chunks())

    def _json(self):
        try:
            return json.loads(self._body() or b"null")
        except ValueError as exc:
            raise HubError(400, f"Request body is not valid JSON: {exc}") from None

    # ---- responses ---------------------------------------------------------------------------------------------
    def _start(self, status: int, headers: dict) -> None:
        self.status = status
        if not self.control:  # log before answering, so a client that reads the log next sees this request
            self.hub.log(self.command, self.path, status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, payload=None, content_type: str = "application/json", headers=None) -> None:
        body = json.dumps(payload).encode() if payload is not None else b""
        self._start(status, {**(headers or {}), "Content-Type": content_type, "Content-Length": str(len(body))})
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, err: HubError, payload: dict | None = None) -> None:
        if self.body_state == "unread":
            self._body()  # keep the connection usable for the next request
        elif self.body_state == "reading":
            self.close_connection = True
        headers = {"X-Error-Message": " ".join(err.message.split()).encode("latin-1", "replace").decode("latin-1")}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, payload or {"error": err.message}, headers={**headers, **err.headers})

    # ---- control routes (no auth, no faults, not logged) -------------------------------------------------------
    def _control(self, method: str, path: str) -> None:
        if (method, path) == ("GET", "/_log"):
            return self._send(200, [list(entry) for entry in self.hub.requests])
        if (method, path) == ("DELETE", "/_log"):
            return self.hub.clear_log() or self._send(200, {})
        if (method, path) == ("GET", "/_faults"):
            return self._send(200, [asdict(fault) for fault in self.hub.faults])
        if (method, path) == ("DELETE", "/_faults"):
            return self.hub.clear_faults() or self._send(200, {})
        if (method, path) == ("POST", "/_faults"):
            for spec in self._json() or []:
                spec = dict(spec)
                spec.setdefault("path_regex", spec.pop("path", ""))
                try:
                    self.hub.add_fault(**spec)
                except (TypeError, ValueError, re.error) as exc:
                    raise HubError(400, f"Bad fault spec {spec}: {exc}") from None
            return self._send(200, [asdict(fault) for fault in self.hub.faults])
        self._send(405, {"error": f"{method} not allowed on {path}"})

    # ---- account and repos -------------------------------------------------------------------------------------
    def route_whoami(self, params: dict) -> None:
        user = self.hub.user
        self._send(200, {"type": "user", "id": f"id-{user}", "name": user, "fullname": user, "email": None,
                         "orgs": [], "auth": {"type": "access_token",
                                              "accessToken": {"displayName": "test", "role": "write"}}})

    def route_create_repo(self, params: dict) -> None:
        body = self._json() or {}
        if body.get("type", "model") not in ("model", "dataset"):
            raise HubError(400, "This test Hub only hosts model and dataset repos")
        prefix = "datasets/" if body.get("type") == "dataset" else ""
        repo_id = f"{body.get('organization') or self.hub.user}/{body['name']}"
        url = f"{self.hub.url}/{prefix}{repo_id}"
        private = body.get("visibility") == "private" or bool(body.get("private"))
        try:
            self.hub.store.create_repo(prefix + repo_id, private=private)
        except HubError as err:
            return self._send_error(err, {"error": err.message, "url": url})
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def route_delete_repo(self, params: dict) -> None:
        body = self._json() or {}
        prefix = "datasets/" if body.get("type") == "dataset" else ""
        self.hub.store.delete_repo(f"{prefix}{body.get('organization') or self.hub.user}/{body['name']}")
        self._send(200, {})

    def route_validate_yaml(self, params: dict) -> None:
        match = _FRONT_MATTER.match((self._json() or {}).get("content", ""))
        error = None
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    error = f"YAML metadata must be a mapping, got {type(metadata).__name__}"
            except yaml.YAMLError as exc:
                error = f"Invalid YAML metadata: {exc}"
        if error:
            payload = {"error": error, "errors": [{"message": error}], "warnings": []}
            return self._send_error(HubError(400, error), payload)
        self._send(200, {"errors": [], "warnings": []})

    def _commit_at(self, params: dict) -> tuple[dict, str, dict]:
        """(repo metadata, commit oid, files) for the repo and revision in the route."""
        meta = self.hub.store.load(params["key"])
        oid = self.hub.store.resolve(meta, params.get("rev", "main"))
        return meta, oid, meta["commits"][oid]["files"]

    def route_repo_info(self, params: dict) -> None:
        meta, oid, files = self._commit_at(params)
        blobs = _flag(self.query.get("blobs"))
        siblings = []
        for path, entry in sorted(files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["gitoid"])
                if entry["lfs"]:
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                                      "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
            siblings.append(sibling)
        self._send(200, {"_id": params["repo"], "id": params["repo"], "modelId": params["repo"],
                         "author": params["repo"].split("/")[0], "sha": oid, "private": meta["private"],
                         "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                         "createdAt": meta["createdAt"], "lastModified": meta["commits"][oid]["date"],
                         "siblings": siblings, "usedStorage": sum(e["size"] for e in files.values())})

    # ---- trees -------------------------------------------------------------------------------------------------
    def _entry(self, meta: dict, oid: str, files: dict, path: str, expand: bool) -> dict:
        if path in files:
            entry = files[path]
            out = {"type": "file", "oid": entry["gitoid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
                out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
        else:
            out = {"type": "directory", "oid": self.hub.store.folder_oid(files, path), "size": 0, "path": path}
        if expand:
            commit = self.hub.store.last_commit(meta, oid, path)
            out["lastCommit"] = {"id": commit["oid"], "title": commit["title"], "date": commit["date"]}
        return out

    def route_tree(self, params: dict) -> None:
        meta, oid, files = self._commit_at(params)
        folder = params.get("path", "").strip("/")
        folders = self.hub.store.folders(files)
        if folder and folder not in folders:
            raise HubError(404, f"{folder} does not exist on {params['rev']}", "EntryNotFound")
        prefix = folder + "/" if folder else ""
        recursive = _flag(self.query.get("recursive"))
        paths = [p for p in sorted(folders) + sorted(files)
                 if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
        expand = _flag(self.query.get("expand"))
        self._send(200, [self._entry(meta, oid, files, p, expand) for p in paths])

    def route_paths_info(self, params: dict) -> None:
        meta, oid, files = self._commit_at(params)
        form = parse_qs(self._body().decode())
        known = set(files) | self.hub.store.folders(files)
        paths = [p.strip("/") for p in form.get("paths", [])]
        expand = _flag(form.get("expand"))
        self._send(200, [self._entry(meta, oid, files, p, expand) for p in paths if p in known])

    # ---- upload: preupload, LFS, commit ------------------------------------------------------------------------
    def _refuse_pull_requests(self) -> None:
        if _flag(self.query.get("create_pr")):
            raise HubError(400, "Pull requests (create_pr=True) are not supported by this test Hub")

    def route_preupload(self, params: dict) -> None:
        self._refuse_pull_requests()
        body = self._json() or {}
        _, _, files = self._commit_at(params)
        answers = []
        for item in body.get("files", []):
            remote = files.get(item["path"])
            remote_oid = (remote["sha256"] if remote["lfs"] else remote["gitoid"]) if remote else None
            mode = upload_mode(item["path"], int(item["size"]), base64.b64decode(item.get("sample", "")))
            answers.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        self._send(200, {"files": answers})

    def route_lfs_batch(self, params: dict) -> None:
        body = self._json() or {}
        self.hub.store.load(params["key"])
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                objects.append({"oid": oid, "size": size or 0, "error": {"code": 422, "message": "Invalid object"}})
            elif self.hub.store.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # no actions: already uploaded
            else:
                actions = {"upload": {"href": f"{self.hub.url}/_lfs/{oid}", "header": {}},
                           "verify": {"href": f"{self.hub.url}/_lfs/{oid}/verify", "header": {}}}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def route_lfs_upload(self, params: dict) -> None:
        self.hub.store.put_blob_stream(params["oid"], self._chunks())
        self._send(200)

    def route_lfs_verify(self, params: dict) -> None:
        body = self._json() or {}
        if not self.hub.store.has_blob(params["oid"], body.get("size")):
            raise HubError(404, f"LFS object {params['oid']} was not uploaded (or has another size)")
        self._send(200, {})

    def route_commit(self, params: dict) -> None:
        self._refuse_pull_requests()
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except ValueError as exc:
            raise HubError(400, f"Commit payload is not valid NDJSON: {exc}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        oid = self.hub.store.commit(params["key"], params["rev"], lines[0]["value"], lines[1:])
        url = f"{self.hub.url}/{params['url_prefix']}{params['repo']}/commit/{oid}"
        self._send(200, {"commitOid": oid, "commitUrl": url,
                         "pullRequestUrl": None, "success": True, "hookOutput": ""})

    # ---- history and refs --------------------------------------------------------------------------------------
    def route_list_commits(self, params: dict) -> None:
        meta, oid, _ = self._commit_at(params)
        self._send(200, [{"id": c["oid"], "title": c["title"], "message": c["message"], "date": c["date"],
                          "authors": [{"user": self.hub.user}]} for c in self.hub.store.history(meta, oid)])

    def route_refs(self, params: dict) -> None:
        meta = self.hub.store.load(params["key"])

        def refs(kind: str, prefix: str) -> list[dict]:
            return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": o} for n, o in sorted(meta[kind].items())]

        self._send(200, {"branches": refs("branches", "refs/heads/"), "tags": refs("tags", "refs/tags/"),
                         "converts": [], "pullRequests": []})

    def route_ref(self, params: dict) -> None:
        """POST tag/{rev} {"tag"}: tag a revision. POST branch/{name} {"startingPoint"}. DELETE tag|branch/{name}."""
        kind = "tags" if params["kind"] == "tag" else "branches"
        body = self._json() or {}
        if self.command == "DELETE":
            if params["rev"] == "main" and kind == "branches":
                raise HubError(403, "The main branch cannot be deleted")
            self.hub.store.delete_ref(params["key"], kind, params["rev"])
        elif kind == "tags":
            self.hub.store.create_ref(params["key"], kind, body["tag"], params["rev"])
        else:
            self.hub.store.create_ref(params["key"], kind, params["rev"], body.get("startingPoint"))
        self._send(200, {})

    # ---- download ----------------------------------------------------------------------------------------------
    def route_resolve(self, params: dict) -> None:
        _, oid, files = self._commit_at(params)
        entry = files.get(params["path"])
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": oid})
        size, (start, end) = entry["size"], (0, entry["size"] - 1)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry["sha256"] if entry["lfs"] else entry["gitoid"]}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, wanted = 200, self.headers.get("Range")
        if wanted and self.command == "GET":
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if match and match.group(1):
                start, end = int(match.group(1)), min(int(match.group(2) or size - 1), size - 1)
            elif match and match.group(2):
                start = max(size - int(match.group(2)), 0)
            if not match or match.groups() == ("", "") or start >= size or start > end:
                raise HubError(416, f"Range not satisfiable: {wanted}", headers={"Content-Range": f"bytes */{size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        self._start(status, {**headers, "Content-Length": str(end - start + 1)})
        if self.command == "GET":
            with self.hub.store.open_blob(entry["sha256"]) as blob:
                blob.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = blob.read(min(remaining, 1 << 20))
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
