"""A local stand-in for the Hugging Face Hub, on 127.0.0.1: the part of its HTTP API that
huggingface_hub uses to download a model (repo info with file sizes and sha256, HEAD and ranged GET of
`resolve/<revision>/<file>` with the headers it expects), serving model directories as repos.

It can refuse a gated repo (403 GatedRepo) or a bad token (401), answer unknown repos and revisions
as the Hub does, drop the connection partway through a file, serve a shard with one byte flipped,
and slow the shards down so that a test can watch a run in flight. Point HF_ENDPOINT at `url`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, Path], tokens: tuple[str, ...] = ()):
        self.repos = {repo: Path(d) for repo, d in repos.items()}
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.tokens = set(tokens)  # tokens the hub accepts (none sent is accepted too, for public repos)
        self.gated: set[str] = set()  # repos no token may download from
        self.corrupt: set[str] = set()  # file names served with one byte flipped
        self.cut_after: dict[str, int] = {}  # file name -> bytes served before the network "goes down"
        self.down = False  # every request is refused while the network is "down"
        self.bytes_per_second: float | None = None  # pace of shard downloads
        self.log: list[tuple[str, str, str]] = []  # (method, path, Range header) of every request
        self._sha256: dict[Path, str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        """The safetensors files fetched by GET from their start or a resume point (not the range
        requests for a header), in order."""
        return [p.rsplit("/", 1)[1] for m, p, r in self.log
                if m == "GET" and p.endswith(".safetensors") and "/resolve/" in p and not re.fullmatch(r"bytes=\d+-\d+", r)]

    def sha256(self, path: Path) -> str:
        if path not in self._sha256:
            self._sha256[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._sha256[path]

    def repo_info(self, repo: str) -> dict:
        siblings = []
        for path in sorted(p for p in self.repos[repo].iterdir() if p.is_file()):
            entry = {"rfilename": path.name, "size": path.stat().st_size}
            if path.suffix == ".safetensors":
                entry["lfs"] = {"sha256": self.sha256(path), "size": path.stat().st_size, "pointerSize": 134}
                entry["blobId"] = git_blob_sha(b"pointer " + path.name.encode())
            else:
                entry["blobId"] = git_blob_sha(path.read_bytes())
            siblings.append(entry)
        return {"id": repo, "modelId": repo, "sha": self.commits[repo], "private": False, "gated": "manual" if repo in
                self.gated else False, "disabled": False, "tags": [], "siblings": siblings}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.log.append((self.command, path, self.headers.get("Range", "")))
                if hub.down:
                    self.close_connection = True
                    self.connection.close()
                    return
                auth = self.headers.get("Authorization", "")
                if auth and auth.removeprefix("Bearer ") not in hub.tokens:
                    return self._error(401, None, "Invalid credentials in Authorization header")
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m:
                    repo = self._repo(m.group(1), m.group(2) or "main")
                    if repo is not None:
                        self._json(hub.repo_info(repo))
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    return self._error(404, None, "not found")
                repo = self._repo(m.group(1), m.group(2))
                if repo is None:
                    return
                if repo in hub.gated:
                    return self._error(403, "GatedRepo", f"Access to model {repo} is restricted")
                file = hub.repos[repo] / m.group(3)
                if not file.is_file() or "/" in m.group(3):
                    return self._error(404, "EntryNotFound", "Entry not found", repo)
                self._file(repo, file, body)

            def _repo(self, repo: str, revision: str) -> str | None:
                if repo not in hub.repos:
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None
                if revision not in ("main", hub.commits[repo]):
                    self._error(404, "RevisionNotFound", "Invalid rev id", repo)
                    return None
                return repo

            def _file(self, repo: str, file: Path, body: bool) -> None:
                size = file.stat().st_size
                lfs = file.suffix == ".safetensors"
                etag = hub.sha256(file) if lfs else git_blob_sha(file.read_bytes())
                start, stop, status = 0, size, 200
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if rng:
                    start = int(rng.group(1))
                    stop = min(int(rng.group(2)) + 1, size) if rng.group(2) else size
                    status = 206
                self.send_response(status)
                self.send_header("X-Repo-Commit", hub.commits[repo])
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(stop - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                self.end_headers()
                if body:
                    self._send(file, start, stop, size)

            def _send(self, file: Path, start: int, stop: int, size: int) -> None:
                import time

                cut = hub.cut_after.get(file.name)
                paced = hub.bytes_per_second and file.suffix == ".safetensors" and stop - start > 1 << 20
                step, t0 = 1 << 18, time.monotonic()
                with open(file, "rb") as f:
                    f.seek(start)
                    for at in range(start, stop, step):
                        if cut is not None and at >= cut:
                            hub.down = True  # the network goes down mid-file, until the test brings it back
                            self.close_connection = True
                            self.connection.close()
                            return
                        chunk = bytearray(f.read(min(step, stop - at)))
                        if file.name in hub.corrupt and at <= size // 2 < at + len(chunk):
                            chunk[size // 2 - at] ^= 0xFF
                        try:
                            self.wfile.write(chunk)
                        except (BrokenPipeError, ConnectionResetError):  # the client went away (a killed run)
                            return
                        if paced:  # sleep until the paced schedule has caught up with what was sent
                            time.sleep(max(0.0, (at + len(chunk) - start) / hub.bytes_per_second - (time.monotonic() - t0)))

            def _json(self, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            def _error(self, status: int, code: str | None, message: str, repo: str | None = None) -> None:
                data = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                if repo:
                    self.send_header("X-Repo-Commit", hub.commits[repo])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

        return Handler
