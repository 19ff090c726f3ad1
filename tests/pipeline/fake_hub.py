"""A minimal stand-in for the Hub's HTTP API on 127.0.0.1: the endpoints huggingface_hub calls for
create_repo, create_branch and upload_folder (preupload, basic LFS batch transfer, ndjson commit).

It stores what arrives so tests can compare names and bytes with the folder that was pushed, and
refuses what the Hub refuses (no token, commit referencing an LFS object never uploaded, bad sha256).
The server shuts itself down after ``lifetime`` seconds so a hung client cannot keep a test alive.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hf_test_token"


class _Bounded:
    """A loopback server thread that stops after ``lifetime`` seconds, whatever the client does."""

    def _start(self, serve, lifetime: float) -> None:
        self.thread = threading.Thread(target=serve, daemon=True)
        self.timer = threading.Timer(lifetime, self.close)

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class FakeHub(_Bounded):
    def __init__(self, lifetime: float = 60.0):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {rev: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                hub._handle(self, "POST")

            def do_PUT(self):
                hub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._start(self.server.serve_forever, lifetime)

    def close(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    # -- request handling ----------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        path = h.path.split("?")[0]
        with self.lock:
            self.requests.append((method, path))
        if h.headers.get("Authorization") != f"Bearer {TOKEN}" and not path.startswith("/lfs-"):
            return self._send(h, 401, {"error": "Invalid credentials in Authorization header"})
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda b: (200, {"errors": [], "warnings": []})),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", self._branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/lfs-verify", self._lfs_verify),
        ]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                status, payload = fn(body, **match.groupdict())
                return self._send(h, status, payload)
        self._send(h, 404, {"error": f"no route {method} {path}"})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _repo(self, repo: str, rev: str) -> dict | None:
        entry = self.repos.get(repo)
        return None if entry is None else entry["branches"].get(rev)

    def _create_repo(self, body: bytes):
        req = json.loads(body)
        repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        url = f"{self.url}/{repo}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo] = {"private": bool(req.get("private")) or req.get("visibility") == "private",
                            "branches": {"main": {}}}
        return 200, {"url": url, "name": repo}

    def _branch(self, body: bytes, repo: str, rev: str):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        branches = self.repos[repo]["branches"]
        if rev in branches:
            return 409, {"error": "Reference already exists"}
        branches[rev] = dict(branches["main"])
        return 200, {}

    def _preupload(self, body: bytes, repo: str, rev: str):
        if self._repo(repo, rev) is None:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        # Like the Hub's default .gitattributes: weights go through LFS, small text as plain git blobs.
        return 200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > 10_000_000
                                else "regular"} for f in files]}

    def _lfs_batch(self, body: bytes, repo: str):
        req = json.loads(body)
        assert req["operation"] == "upload" and "basic" in req["transfers"]
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
                                "verify": {"href": f"{self.url}/lfs-verify"}}} for o in req["objects"]]
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_put(self, body: bytes, oid: str):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "content does not match its sha256"}
        self.lfs[oid] = body
        return 200, {}

    def _lfs_verify(self, body: bytes):
        req = json.loads(body)
        ok = req["oid"] in self.lfs and len(self.lfs[req["oid"]]) == req["size"]
        return (200, {}) if ok else (404, {"error": "object not found"})

    def _commit(self, body: bytes, repo: str, rev: str):
        files = self._repo(repo, rev)
        if files is None:
            return 404, {"error": "Repository or revision not found"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "commit payload must start with a header"}
        for line in lines[1:]:
            v = line["value"]
            if line["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif line["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {v['oid']} was never uploaded"}
                files[v["path"]] = self.lfs[v["oid"]]
            else:
                return 400, {"error": f"unsupported operation {line['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}


class SilentServer(_Bounded):
    """A server on 127.0.0.1 that accepts connections, reads what arrives and never answers: what a hung or
    black-holed endpoint looks like to a client. It closes every connection after ``lifetime`` seconds."""

    def __init__(self, lifetime: float = 30.0):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.conns: list = []
        self.closed = threading.Event()
        self._start(self._serve, lifetime)

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)  # kept open, never written to

    def close(self) -> None:
        self.closed.set()
        self.timer.cancel()
        self.sock.close()
        for c in self.conns:
            c.close()
