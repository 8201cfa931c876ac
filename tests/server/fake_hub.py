"""A small Hugging Face Hub stand-in on 127.0.0.1 for `longserve download` tests: the three requests that
huggingface_hub's `model_info(files_metadata=True)` and `hf_hub_download` make, answered the way the Hub answers
them (headers X-Repo-Commit / ETag / X-Error-Code, 401 and 403 for gated repositories, Range requests).

Faults to inject: `fail_get[name] = status` answers every GET of that file with the status; `cut_once[name] = n`
sends only the first n bytes of the next GET of that file and closes the connection. `requests` records
(method, path, Range header) of every request.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision == self.commit:
            return revision
        return self.branches.get(revision)


def repo_from_dir(directory: str, *, extra: dict[str, bytes] | None = None, gated: bool = False,
                  seed: str = "a") -> Repo:
    files = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as fh:
            files[name] = fh.read()
    files.update(extra or {})
    commit = hashlib.sha1(seed.encode() + b"".join(files.values())).hexdigest()
    return Repo(files=files, commit=commit, branches={"main": commit}, gated=gated)


def _is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin"))


def _etag(name: str, data: bytes) -> str:
    if _is_lfs(name):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()   # a git blob id


class FakeHub:
    def __init__(self, token: str = "hf_good"):
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.fail_get: dict[str, int] = {}
        self.cut_once: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):     # quiet
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, start: int = 0) -> list[str]:
        """Files fetched with GET /resolve since request number `start`."""
        return [p.rsplit("/", 1)[-1] for m, p, _ in self.requests[start:] if m == "GET" and "/resolve/" in p]

    # -- request handling ---------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append((method, path, h.headers.get("Range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m and method == "GET":
            return self._info(h, m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(h, method, m.group(1), m.group(2), m.group(3))
        self._error(h, 404, "EntryNotFound", method)

    def _authorize(self, h, repo_id: str, method: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", method)
            return None
        if repo.gated:
            auth = h.headers.get("Authorization")
            if auth is None:
                self._error(h, 401, "GatedRepo", method, "Access to model is restricted. You must be authenticated")
                return None
            if auth != f"Bearer {self.token}":
                self._error(h, 403, "GatedRepo", method, "Access to model is restricted and you are not in the "
                                                         "authorized list")
                return None
        return repo

    def _info(self, h, repo_id: str, revision: str) -> None:
        repo = self._authorize(h, repo_id, "GET")
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", "GET")
        siblings = []
        for name, data in repo.files.items():
            s = {"rfilename": name, "size": len(data), "blobId": _etag(name, data) if not _is_lfs(name) else
                 hashlib.sha1(data).hexdigest()}
            if _is_lfs(name):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                           "gated": "manual" if repo.gated else False, "siblings": siblings}).encode()
        self._send(h, 200, {"Content-Type": "application/json"}, body, "GET")

    def _file(self, h, method: str, repo_id: str, revision: str, name: str) -> None:
        repo = self._authorize(h, repo_id, method)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", method)
        if name not in repo.files:
            return self._error(h, 404, "EntryNotFound", method, extra={"X-Repo-Commit": commit})
        if method == "GET" and name in self.fail_get:
            return self._error(h, self.fail_get[name], None, method)
        data = repo.files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_etag(name, data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return self._send(h, 200, headers, b"", "HEAD")
        status, start = 200, 0
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if rng:
            status, start = 206, int(rng.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        cut = self.cut_once.pop(name, None)
        if cut is not None:       # announce the whole body, send part of it, drop the connection
            h.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            return
        self._send(h, status, headers, body, "GET")

    def _error(self, h, status: int, code: str | None, method: str, message: str | None = None,
               extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        body = json.dumps({"error": message or code or f"HTTP {status}"}).encode()
        self._send(h, status, headers, body, method)

    @staticmethod
    def _send(h, status: int, headers: dict, body: bytes, method: str) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)
