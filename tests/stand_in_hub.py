"""A stand-in for the Hugging Face Hub over HTTP, for tests: the four requests snapshot_download
makes (repo info, tree listing, HEAD and GET of a file), from local directories. Point
HF_ENDPOINT at `StandInHub.url` in the process that downloads."""

from __future__ import annotations

import hashlib
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class StandInHub(ThreadingHTTPServer):
    """The Hub's repo info, tree listing and file (HEAD, GET) routes over `repos`:
    repo id -> branch -> (commit, directory). Records each request."""

    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, tuple[str, Path]]]) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        # A commit is a revision too (snapshot_download lists and fetches by commit).
        self.repos = {
            repo: {**revs, **{commit: (commit, root) for commit, root in revs.values()}}
            for repo, revs in repos.items()
        }
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


_ROUTES = {
    "info": re.compile(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)"),
    "tree": re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)"),
    "file": re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)"),
}


class _HubHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(f"{self.command} {path}")
        for route, pattern in _ROUTES.items():
            m = pattern.fullmatch(path)
            if m is None:
                continue
            revisions = self.server.repos.get(m[1])
            if revisions is None:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)
            if m[2] not in revisions:
                return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, body)
            commit, root = revisions[m[2]]
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            if route == "info":
                info = {"id": m[1], "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                return self._send(200, json.dumps(info).encode(), {}, body)
            if route == "tree":
                tree = [
                    {
                        "type": "file",
                        "path": f,
                        "size": (root / f).stat().st_size,
                        "oid": _sha1(root / f),
                    }
                    for f in files
                ]
                return self._send(200, json.dumps(tree).encode(), {}, body)
            headers = {"X-Repo-Commit": commit}
            if m[3] not in files:
                return self._send(404, b"", {**headers, "X-Error-Code": "EntryNotFound"}, body)
            data = (root / m[3]).read_bytes()
            headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._send(200, data, headers, body)
        self._send(404, b"", {}, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
