"""A stand-in for the Hugging Face hub on 127.0.0.1, for tests without network.

It serves repositories held in memory (commit -> {path: bytes}, branch -> commit) through
the few endpoints `huggingface_hub.snapshot_download` uses: repository info at a revision,
the recursive file tree of a commit, and file downloads (HEAD for metadata, then GET).
Point the hub client at it with `endpoint()` (the value of HF_ENDPOINT).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    branches: dict[str, str] = field(default_factory=dict)  # "main", "refs/convert/parquet" -> sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


class HubReplica:
    """Dataset repositories by id, served over HTTP while the object is open."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubReplica":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, repo_id: str, sha: str, files: dict[str, bytes], branch: str | None = None) -> None:
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[sha] = files
        if branch:
            repo.branches[branch] = sha


class _Handler(BaseHTTPRequestHandler):
    hub: HubReplica

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.hub.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, revision = f"{parts[2]}/{parts[3]}", unquote(parts[5])
            repo, sha = self._resolve(repo_id, revision)
            if sha is None:
                return
            files = repo.commits[sha]
            if parts[4] == "revision":
                info = {"id": repo_id, "sha": sha, "private": False, "disabled": False, "gated": False,
                        "siblings": [{"rfilename": name} for name in sorted(files)], "tags": []}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
            tree = [{"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                    for name, data in sorted(files.items())]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
            repo_id, revision, name = f"{parts[1]}/{parts[2]}", unquote(parts[4]), "/".join(map(unquote, parts[5:]))
            repo, sha = self._resolve(repo_id, revision)
            if sha is None:
                return
            if name not in repo.commits[sha]:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body)
            data = repo.commits[sha][name]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_oid(data)}"', "Content-Length": str(len(data))}
            return self._send(200, data, headers, body)
        self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)

    def _resolve(self, repo_id: str, revision: str) -> tuple[Repo | None, str | None]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, self.command == "GET")
            return None, None
        sha = repo.resolve(revision)
        if sha is None:
            self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, self.command == "GET")
        return repo, sha

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()
