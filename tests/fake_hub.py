"""A minimal stand-in for the Hub's HTTP API on 127.0.0.1: the endpoints huggingface_hub calls for
create_repo, create_branch and upload_folder (preupload, basic LFS batch transfer, ndjson commit), and for
downloads (repo info with sha and siblings, the tree listing, HEAD/GET ``resolve/{revision}/{file}`` with
``X-Repo-Commit``, ``ETag`` and ``Content-Length``), so the real client fills a real cache.

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
from pathlib import Path
from urllib.parse import unquote
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


class _HTTP(_Bounded):
    """A loopback HTTP server answering through ``handler``, stopped after ``lifetime`` seconds."""

    def _listen(self, handler, lifetime: float) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._start(self.server.serve_forever, lifetime)

    def close(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


class FakeHub(_HTTP):
    def __init__(self, lifetime: float = 60.0):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {rev: {path: bytes}}}
        self.commits: dict[str, dict[str, bytes]] = {}  # commit sha -> files
        self.heads: dict[tuple[str, str], str] = {}  # (repo, branch or tag) -> commit sha
        self.gated: set[str] = set()
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

            def do_GET(self):
                hub._download(self, "GET")

            def do_HEAD(self):
                hub._download(self, "HEAD")

        self._listen(Handler, lifetime)

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
    def _send(h: BaseHTTPRequestHandler, status: int, payload, headers: dict | None = None,
              body: bytes | None = None, head: bool = False) -> None:
        data = body if body is not None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(data)

    # -- serving models for download ----------------------------------------------------------
    def serve(self, repo: str, source, revision: str = "main", gated: bool = False) -> str:
        """Publish ``source`` (a folder, or {path: bytes}) as ``repo`` at branch/tag ``revision``; returns the
        commit sha."""
        if not isinstance(source, dict):
            root = Path(source)
            source = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        sha = hashlib.sha1(repo.encode() + b"".join(k.encode() + hashlib.sha1(v).digest()
                                                     for k, v in sorted(source.items()))).hexdigest()
        with self.lock:
            entry = self.repos.setdefault(repo, {"private": False, "branches": {}})
            entry["branches"][revision] = dict(source)
            self.commits[sha] = dict(source)
            self.heads[(repo, revision)] = sha
            if gated:
                self.gated.add(repo)
        return sha

    def _files_at(self, repo: str, rev: str) -> tuple[str, dict] | None:
        sha = self.heads.get((repo, rev)) or (rev if rev in self.commits and any(
            r == repo and s == rev for (r, _), s in self.heads.items()) else None)
        return (sha, self.commits[sha]) if sha else None

    @staticmethod
    def _is_lfs(path: str, data: bytes) -> bool:
        return path.endswith(".safetensors") or len(data) > 10_000_000

    def _download(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(h.path.split("?")[0])
        with self.lock:
            self.requests.append((method, path))
        head = method == "HEAD"
        routes = [r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?P<sub>/.*)?",
                  r"/api/models/(?P<repo>[^/]+)/tree/(?P<rev>[^/]+)(?P<sub>/.*)?",
                  r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)",
                  r"/api/models/(?P<repo>[^/]+)/revision/(?P<rev>.+)",
                  r"/api/models/(?P<repo>[^/]+/[^/]+)", r"/api/models/(?P<repo>[^/]+)",
                  r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)",
                  r"/(?P<repo>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)"]
        for pattern in routes:
            m = re.fullmatch(pattern, path)
            if m and m.group("repo") in self.repos:
                return self._answer(h, m.groupdict(), pattern, head)
        self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head=head)

    def _answer(self, h, g: dict, pattern: str, head: bool) -> None:
        repo, rev = g["repo"], g.get("rev") or "main"
        if repo in self.gated and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(h, 401, {"error": "Access to this model is restricted"}, {"X-Error-Code": "GatedRepo"},
                              head=head)
        found = self._files_at(repo, rev)
        if found is None:
            return self._send(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}, head=head)
        sha, files = found
        if "/tree/" in pattern:
            return self._send(h, 200, self._tree(files, (g.get("sub") or "").strip("/")), head=head)
        if "/resolve/" not in pattern:
            return self._send(h, 200, {"id": repo, "modelId": repo, "sha": sha, "private": False,
                                       "gated": "manual" if repo in self.gated else False,
                                       "siblings": [{"rfilename": p} for p in sorted(files)], "tags": []}, head=head)
        data = files.get(g["file"])
        if data is None:
            return self._send(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                      "X-Repo-Commit": sha}, head=head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{self._blob(data)}"'}
        if self._is_lfs(g["file"], data):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self._send(h, 200, None, headers, body=data, head=head)

    @staticmethod
    def _blob(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _tree(self, files: dict, sub: str) -> list:
        entries, dirs = [], set()
        for p, data in sorted(files.items()):
            if sub and not p.startswith(sub + "/"):
                continue
            parts = p.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "oid": self._blob(data), "size": len(data), "path": p}
            if self._is_lfs(p, data):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + entries

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
            self.conns.append(conn)  # kept open
            self._answer(conn)

    def _answer(self, conn) -> None:
        """Never written to."""

    def close(self) -> None:
        self.closed.set()
        self.timer.cancel()
        self.sock.close()
        for c in self.conns:
            c.close()


class DripServer(SilentServer):
    """A server on 127.0.0.1 that answers every connection one byte every ``interval`` seconds, forever: each read
    gets data in time, so only a deadline on the whole request ends it."""

    def __init__(self, interval: float = 0.5, lifetime: float = 30.0, body: bool = False):
        """``body``: send a JSON answer's headers at once, then drip its body (else drip from the status line)."""
        self.interval = interval
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        self.prefix, self.answer = (head + b"Content-Length: 100000\r\n\r\n", b"[" + b" " * 99_999) if body else \
            (b"", head + b"X-Padding: " + b"x" * 100_000)
        super().__init__(lifetime)

    def _answer(self, conn) -> None:
        threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn) -> None:
        try:
            conn.recv(65536)  # the request (its headers at least): then answer
            conn.sendall(self.prefix)
            for i in range(len(self.answer)):
                if self.closed.wait(self.interval):
                    return
                conn.sendall(self.answer[i:i + 1])
        except OSError:
            return


class AnswerServer(_HTTP):
    """A server on 127.0.0.1 answering every request with the same status, headers and body: an HTML page where
    JSON is expected, or a redirect back to itself."""

    def __init__(self, status: int, body: bytes = b"", headers: dict | None = None, lifetime: float = 30.0):
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests += 1
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v.replace("{url}", server.url))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

        self._listen(Handler, lifetime)
