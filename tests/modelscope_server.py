"""A local HTTPS server that answers the ModelScope API calls of modelscope 1.25.0's snapshot_download.

    with serve(folder, model_id="Tencent-Hunyuan/Hunyuan-A13B-Instruct", cut_after={"a.bin": 1000}) as srv:
        # client side: MODELSCOPE_DOMAIN=srv.domain, REQUESTS_CA_BUNDLE=srv.ca_file
        ...
        srv.file_requests("a.bin")  # what the client asked for, in order

It serves the files of one local folder for every revision it knows (branches and tags), over TLS
with a certificate from an in-memory `trustme` CA: modelscope 1.25.0 builds every URL as
"https://" + MODELSCOPE_DOMAIN, so plain HTTP cannot be used.

Endpoints (all GET, JSON answers wrapped as {"Code", "Data", "Message", "RequestId", "Success"}):
  /api/v1/models/{owner}/{name}                          repo info (HubApi.repo_exists / get_model)
  /api/v1/models/{owner}/{name}/revisions[?EndTime=t]    {"RevisionMap": {"Branches": [...], "Tags": [...]}}
  /api/v1/models/{owner}/{name}/repo/files?Revision=r&Recursive=True   {"Files": [{Path, Size, Sha256, ...}]}
  /api/v1/models/{owner}/{name}/repo?Revision=r&FilePath=p             the file's bytes; honours Range

Fault switches (constructor arguments), for tests of the client's error handling:
  cut_after={path: n}     the first transfer of `path` sends its headers and n body bytes, then the
                          connection is dropped (later transfers are whole)
  wrong_content={path: b} `path` is listed with the real file's size/sha256 but served as b
  hidden={path, ...}      `path` is neither listed nor served
  listed_size={path: n}   the listing claims `path` has n bytes (nothing else changes)
  omit_sha256=True        the listing has no Sha256 keys (the client then cannot check hashes)
  strip_auto_map=True     config.json is listed and served without its "auto_map" key
  broken_file_list=True   the file list answers 200 without Data.Files (an API shape change)
  stall_after={path: n}   every transfer of `path` sends n body bytes, then holds the connection open
                          without sending more until the server stops (a download in progress)
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import socket
import ssl
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trustme

CHUNK = 64 * 1024


@dataclass
class Request:
    """One request as the server saw it (the test's view of what the client did)."""

    path: str  # URL path without the query
    query: dict[str, str]
    range: str | None  # the Range header, e.g. "bytes=1048576-2621439"
    status: int = 0
    file: str | None = None  # FilePath of a file transfer
    body_bytes: int = 0  # body bytes actually written to the socket
    cut: bool = False  # the connection was dropped on purpose


@dataclass
class _File:
    size: int
    sha256: str
    source: Path | None = None  # read from disk when content is None
    content: bytes | None = None

    def read(self, start: int, end: int) -> bytes:
        if self.content is not None:
            return self.content[start:end]
        with open(self.source, "rb") as f:
            f.seek(start)
            return f.read(end - start)


def _file_from_bytes(data: bytes) -> _File:
    return _File(size=len(data), sha256=hashlib.sha256(data).hexdigest(), content=data)


def _file_from_path(path: Path) -> _File:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return _File(size=path.stat().st_size, sha256=h.hexdigest(), source=path)


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: ModelScopeServer, ctx: ssl.SSLContext):
        self.owner, self.ctx = owner, ctx
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request, client_address):
        # TLS handshake in the connection's own thread, so one slow client cannot block accept().
        try:
            request = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.owner.errors.append(f"TLS handshake from {client_address}: {e}")
            return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        self.owner.errors.append(f"{client_address}: {sys.exc_info()[1]!r}")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real server; every answer has Content-Length

    def do_GET(self):
        self.server.owner._handle(self)

    def log_message(self, format, *args):  # silence the per-request stderr line
        pass


class ModelScopeServer:
    def __init__(
        self,
        folder: str | Path,
        model_id: str = "Tencent-Hunyuan/Hunyuan-A13B-Instruct",
        branches: tuple[str, ...] = ("master",),
        tags: tuple[str, ...] = ("v1.0.0",),
        *,
        cut_after: dict[str, int] | None = None,
        wrong_content: dict[str, bytes] | None = None,
        hidden: set[str] | frozenset[str] = frozenset(),
        listed_size: dict[str, int] | None = None,
        omit_sha256: bool = False,
        strip_auto_map: bool = False,
        broken_file_list: bool = False,
        stall_after: dict[str, int] | None = None,
    ):
        self.folder = Path(folder)
        self.model_id = model_id
        self.cut_after = dict(cut_after or {})
        self.wrong_content = {p: _file_from_bytes(b) for p, b in (wrong_content or {}).items()}
        self.listed_size = dict(listed_size or {})
        self.omit_sha256 = omit_sha256
        self.broken_file_list = broken_file_list
        self.stall_after = dict(stall_after or {})
        self._stopping = threading.Event()
        self.requests: list[Request] = []
        self.errors: list[str] = []  # exceptions inside the server (tests assert it stays empty)
        self._lock = threading.Lock()

        self.files: dict[str, _File] = {}
        for p in sorted(self.folder.rglob("*")):
            rel = p.relative_to(self.folder).as_posix()
            # dot files are local bookkeeping (the stand-in's marker), not part of a ModelScope repo
            if p.is_file() and rel not in hidden and not p.name.startswith("."):
                self.files[rel] = _file_from_path(p)
        if strip_auto_map:
            config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
            config.pop("auto_map", None)
            self.files["config.json"] = _file_from_bytes(json.dumps(config, indent=2).encode())

        # One commit per revision name, stable across runs; the listing's per-file "Revision".
        tree = hashlib.sha1("".join(f"{p}:{f.sha256}" for p, f in self.files.items()).encode())
        self.created_at = 1_700_000_000  # a fixed time before modelscope 1.25.0's release date
        self.revisions: dict[str, dict] = {}
        for kind, names in (("branch", branches), ("tag", tags)):
            for name in names:
                commit = hashlib.sha1(tree.digest() + name.encode()).hexdigest()
                self.revisions[name] = {"kind": kind, "commit": commit}

        self._ca = trustme.CA()
        self._tmp = tempfile.TemporaryDirectory(prefix="modelscope-ca-")
        self.ca_file = str(Path(self._tmp.name) / "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        self._httpd = _TLSServer(self, ctx)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        """What MODELSCOPE_DOMAIN must be set to (host:port; modelscope prepends https://)."""
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> ModelScopeServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="modelscope-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases stalled transfers
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._tmp.cleanup()

    def __enter__(self) -> ModelScopeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the tests read -----------------------------------------------------------------

    def commit(self, revision: str) -> str:
        return self.revisions[revision]["commit"]

    def file_requests(self, path: str | None = None) -> list[Request]:
        """File transfers (all, or those of one file), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.file is not None and (path is None or r.file == path)]

    def listing(self) -> dict[str, dict]:
        """The file list as the server reports it, by path."""
        return {f["Path"]: f for f in self._file_list("master") if f["Type"] == "blob"}

    # -- request handling ----------------------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        req = Request(path=url.path, query=query, range=h.headers.get("Range"))
        with self._lock:
            self.requests.append(req)
        m = re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)(/revisions|/repo/files|/repo)?", url.path)
        if not m or f"{m[1]}/{m[2]}" != self.model_id:
            return self._json(h, req, 404, None, f"model {url.path} does not exist")
        route = m[3] or ""
        if route == "":
            return self._json(h, req, 200, {"Id": 1, "Path": m[1], "Name": m[2], "CreatedTime": self.created_at})
        if route == "/revisions":
            return self._json(h, req, 200, {"RevisionMap": self._revision_map(query.get("EndTime"))})
        revision = query.get("Revision", "master")
        if revision not in self.revisions:
            return self._json(h, req, 404, None, f"revision {revision} does not exist")
        if route == "/repo/files":
            if self.broken_file_list:
                return self._json(h, req, 200, {"Entries": []})
            return self._json(h, req, 200, {"Files": self._file_list(revision)})
        return self._send_file(h, req, query.get("FilePath", ""))

    def _revision_map(self, end_time: str | None) -> dict:
        def detail(name: str) -> dict:
            return {
                "Revision": name,
                "CreatedAt": self.created_at,
                "Message": f"{name} of {self.model_id}",
                "CommitId": self.revisions[name]["commit"],
            }

        tags = [detail(n) for n, r in self.revisions.items() if r["kind"] == "tag"]
        if end_time:
            tags = [t for t in tags if t["CreatedAt"] <= int(end_time)]
        return {"Branches": [detail(n) for n, r in self.revisions.items() if r["kind"] == "branch"], "Tags": tags}

    def _file_list(self, revision: str) -> list[dict]:
        entries, dirs = [], set()
        for path, f in self.files.items():
            parts = path.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {
                "Name": parts[-1],
                "Path": path,
                "Type": "blob",
                "Size": self.listed_size.get(path, f.size),
                "Sha256": f.sha256,
                "Revision": self.revisions[revision]["commit"],
                "IsLFS": f.size > 1_000_000,
                "Mode": "33188",
                "CommittedDate": self.created_at,
                "CommitMessage": "upload",
                "CommitterName": "test",
            }
            if self.omit_sha256:
                del entry["Sha256"]
            entries.append(entry)
        for d in sorted(dirs):
            entries.append(
                {
                    "Name": d.rsplit("/", 1)[-1],
                    "Path": d,
                    "Type": "tree",
                    "Size": 0,
                    "Revision": self.revisions[revision]["commit"],
                }
            )
        # The real server also lists git's own files; modelscope drops them by name.
        entries.append(
            {
                "Name": ".gitattributes",
                "Path": ".gitattributes",
                "Type": "blob",
                "Size": 0,
                "Sha256": hashlib.sha256(b"").hexdigest(),
                "Revision": self.revisions[revision]["commit"],
            }
        )
        return entries

    def _json(self, h: _Handler, req: Request, status: int, data, message: str = "success") -> None:
        body = json.dumps(
            {"Code": status, "Data": data, "Message": message, "RequestId": str(uuid.uuid4()), "Success": status == 200}
        ).encode()
        req.status = status
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        req.body_bytes = len(body)

    def _send_file(self, h: _Handler, req: Request, path: str) -> None:
        req.file = path
        f = self.wrong_content.get(path) or self.files.get(path)
        if f is None:
            return self._json(h, req, 404, None, f"file {path} does not exist")
        start, end = 0, f.size  # [start, end)
        status = 200
        if req.range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", req.range.strip())
            if not m or int(m[1]) >= max(f.size, 1):
                req.status = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{f.size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start, end, status = int(m[1]), min(int(m[2]) + 1 if m[2] else f.size, f.size), 206
        req.status = status
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{f.size}")
        h.end_headers()
        with self._lock:
            limit = self.cut_after.pop(path, None)  # only the first transfer is cut
        stall = self.stall_after.get(path)
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            if limit is not None:
                n = min(n, start + limit - pos)
            if stall is not None and pos + n > stall:
                n = stall - pos
                if n <= 0:
                    h.wfile.flush()
                    self._stopping.wait()
                    h.close_connection = True
                    return
            if n <= 0:
                break
            h.wfile.write(f.read(pos, pos + n))
            pos += n
            req.body_bytes = pos - start
        if limit is not None and pos < end:
            # Drop the connection mid-body, as a network failure would (no TLS close_notify).
            req.cut = True
            h.close_connection = True
            h.wfile.flush()
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)


def serve(folder: str | Path, **kwargs) -> ModelScopeServer:
    """A started-on-enter server: `with serve(folder, cut_after={...}) as srv: ...`."""
    return ModelScopeServer(folder, **kwargs)
