"""A small fake Hugging Face Hub HTTP server for offline upload tests.

``FakeHub`` binds to 127.0.0.1 only (port 0, i.e. a free port chosen by the OS) and serves, from a
daemon thread, the endpoints that ``huggingface_hub`` 2.4 uses for::

    HfApi(endpoint=hub.endpoint, token=...).create_repo(repo_id, exist_ok=True, private=...)
    HfApi(...).upload_folder(folder_path=..., repo_id=..., ignore_patterns=...)
    HfApi(...).upload_file(...)
    diffusers' ``push_to_hub`` (create_repo + ModelCard.load via /resolve + upload_folder)

Every file is answered with ``uploadMode: "regular"`` at preupload time, so neither the LFS nor the
Xet upload protocol is ever used: the file contents arrive base64-encoded in the NDJSON body of the
``/commit`` request, and are decoded and stored in memory.

Endpoints (``{type}`` is ``models``, ``datasets`` or ``spaces``; ``{repo}`` is ``name`` or
``org/name``; ``{rev}`` is URL-quoted):

    GET  /api/whoami-v2
    POST /api/repos/create                     200 {"url": ...}; 409 if it exists (exist_ok passes)
    POST /api/repos/delete
    POST /api/validate-yaml                    README.md front matter check (400 if YAML is bad)
    POST /api/{type}/{repo}/preupload/{rev}    every file "regular"; oid of the stored copy, if any
    POST /api/{type}/{repo}/commit/{rev}       NDJSON: header / file / deletedFile / deletedFolder
    GET  /api/{type}/{repo}[/revision/{rev}]   repo info (id, sha, private, siblings)
    GET  /api/{type}/{repo}/tree/{rev}[/{path}]
    HEAD|GET /[{type}/]{repo}/resolve/{rev}/{path}
    GET  /api/agent-harnesses                  empty registry (huggingface_hub's agent detection)

Anything else gets a 404 and is listed in ``FakeHub.unhandled`` so a test can assert that the
client called nothing unexpected. What the client hit is also in ``FakeHub.requests``.

If ``FakeHub(token=...)`` is given, write endpoints and whoami require ``Authorization: Bearer
<token>`` (401 otherwise), which proves the client sent the token.

Request bodies may be sent with ``Content-Length`` or ``Transfer-Encoding: chunked`` and with
``Content-Encoding: gzip``/``deflate``; every read is bounded (``max_body_bytes``, line lengths,
chunk counts, socket timeout) so a misbehaving client cannot hang or exhaust the test process.

This module also provides :func:`scan_for_secret`, used to prove a token never lands in an output
folder, a log, or a request body.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import http.server
import io
import json
import os
import re
import socket
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "RecordedRequest", "git_blob_oid", "scan_for_secret"]

_MiB = 1024 * 1024
_MAX_LINE = 64 * 1024  # request line, header line or chunk-size line
_MAX_CHUNKS = 1_000_000
_MAX_DRAIN = 64 * _MiB  # most bytes read and discarded from a rejected (too large) body
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

_API_REPO_RE = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)?)"
    r"(?:/(?P<action>preupload|commit|tree|revision)(?:/(?P<rest>.*))?)?$"
)
_RESOLVE_RE = re.compile(
    r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"
)


def git_blob_oid(data: bytes) -> str:
    """The git blob SHA-1 of ``data`` (what the Hub reports as ``oid`` for a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra or {}


@dataclass
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str  # raw path, without the query string
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]
    raw_body: bytes  # body as read off the socket (after de-chunking, before Content-Encoding)
    body: bytes  # body after undoing Content-Encoding (gzip/deflate)
    status: int = 0  # response status, filled in after handling
    client_thread: str = ""

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    @property
    def authorization(self) -> str | None:
        return self.header("authorization")

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    created_at: str = ""
    last_modified: str = ""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, hub: "FakeHub"):
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self):
        conn, addr = super().get_request()
        with self._conns_lock:
            self._conns.add(conn)
        return conn, addr

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                conn.close()
            except OSError:
                pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has Content-Length
    server_version = "FakeHub/1.0"
    timeout = 30  # seconds of socket inactivity before an idle/stuck connection is dropped

    # -------------------------------------------------------------------------------- plumbing
    def log_message(self, format, *args):  # noqa: A002 - silence stderr logging
        return

    def _read_line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _HTTPError(400, "line too long")
        return line

    def _read_exact(self, n: int) -> bytes:
        buf = io.BytesIO()
        remaining = n
        while remaining > 0:
            piece = self.rfile.read(min(remaining, _MiB))
            if not piece:
                raise _HTTPError(400, "request body truncated")
            buf.write(piece)
            remaining -= len(piece)
        return buf.getvalue()

    def _read_raw_body(self) -> bytes:
        limit = self.server.hub.max_body_bytes
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = io.BytesIO()
            for _ in range(_MAX_CHUNKS):
                size_line = self._read_line().split(b";", 1)[0].strip()
                if not size_line:
                    raise _HTTPError(400, "bad chunk size line")
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise _HTTPError(400, "bad chunk size") from None
                if size < 0:
                    raise _HTTPError(400, "bad chunk size")
                if size == 0:
                    for _ in range(1000):  # trailers, up to the empty line
                        if self._read_line() in (b"\r\n", b"\n", b""):
                            break
                    return out.getvalue()
                if out.tell() + size > limit:
                    self.close_connection = True
                    raise _HTTPError(413, "request body too large")
                out.write(self._read_exact(size))
                self._read_line()  # CRLF after the chunk data
            raise _HTTPError(400, "too many chunks")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if n < 0:
            raise _HTTPError(400, "bad Content-Length")
        if n > limit:
            self.close_connection = True
            # Drain (bounded) what the client is sending, so closing the socket does not reset the
            # connection before the client has read the 413.
            remaining = min(n, _MAX_DRAIN)
            while remaining > 0:
                piece = self.rfile.read(min(remaining, _MiB))
                if not piece:
                    break
                remaining -= len(piece)
            raise _HTTPError(413, "request body too large")
        return self._read_exact(n)

    def _decode_body(self, raw: bytes) -> bytes:
        limit = self.server.hub.max_body_bytes
        encodings = [e.strip().lower() for e in (self.headers.get("Content-Encoding") or "").split(",") if e.strip()]
        data = raw
        for enc in reversed(encodings):  # applied in the listed order => undo in reverse
            if enc in ("identity", ""):
                continue
            if enc in ("gzip", "x-gzip"):
                wbits = 16 + zlib.MAX_WBITS
            elif enc == "deflate":
                wbits = zlib.MAX_WBITS if data[:1] == b"\x78" else -zlib.MAX_WBITS
            else:
                raise _HTTPError(415, f"unsupported Content-Encoding {enc!r}")
            d = zlib.decompressobj(wbits)
            try:
                out = d.decompress(data, limit + 1)
            except zlib.error as e:
                raise _HTTPError(400, f"bad {enc} body: {e}") from None
            if len(out) > limit or d.unconsumed_tail:
                raise _HTTPError(413, "decoded request body too large")
            data = out
        return data

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        rec = getattr(self, "_rec", None)
        if rec is not None:  # before any byte is sent, so a client that got the answer sees it
            rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

    def _handle(self) -> None:
        hub: FakeHub = self.server.hub
        self._rec = None
        split = urlsplit(self.path)
        try:
            raw = self._read_raw_body()
            error: _HTTPError | None = None
            try:
                body = self._decode_body(raw)
            except _HTTPError as e:
                body, error = raw, e
        except _HTTPError as e:  # body could not be read: answer and drop the connection
            self.close_connection = True
            rec = RecordedRequest(self.command, split.path, parse_qs(split.query), list(self.headers.items()),
                                  b"", b"", client_thread=threading.current_thread().name)
            hub._record(rec)
            self._rec = rec
            self._json(e.status, {"error": e.message})
            return
        except (OSError, ValueError):
            self.close_connection = True
            return
        rec = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query),
            headers=list(self.headers.items()),
            raw_body=raw,
            body=body,
            client_thread=threading.current_thread().name,
        )
        hub._record(rec)
        self._rec = rec
        try:
            if error is not None:
                raise error
            hub._dispatch(self, rec)
        except _HTTPError as e:
            headers = {}
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            if e.status == 401:
                headers["X-Error-Message"] = "Invalid credentials in Authorization header"
            self._json(e.status, {"error": e.message, **e.extra}, headers)
        except Exception as e:  # a bug in the fake: report it as a 500 rather than hanging the client
            hub._record_error(f"{rec.method} {rec.path}: {e!r}")
            self.close_connection = True
            self._json(500, {"error": f"FakeHub internal error: {e!r}"})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


class FakeHub:
    """In-memory fake of the Hugging Face Hub API, listening on ``http://127.0.0.1:<port>``.

    Use as a context manager (or call ``start()``/``stop()``)::

        with FakeHub(token="hf_x") as hub:
            HfApi(endpoint=hub.endpoint, token="hf_x").upload_folder(...)
            assert hub.files["org/name"]["model.safetensors"] == expected_bytes

    Records (all guarded by a lock; read them after the client call returned):

    * ``created``: one dict per ``/api/repos/create`` call: ``repo_id``, ``repo_type``,
      ``private`` (bool), ``visibility`` (as sent, or None), ``status`` (200 or 409), ``payload``.
    * ``repos``: ``{(repo_type, repo_id): _Repo}`` with ``.private`` and ``.files``.
    * ``files``: ``{repo_key: {path_in_repo: bytes}}``: current contents of each repo. ``repo_key``
      is the repo id for models, ``"datasets/<id>"`` / ``"spaces/<id>"`` otherwise.
    * ``committed``: ``[(repo_key, path_in_repo, bytes)]``, every file in every commit, in order.
    * ``commits``: one dict per commit: ``repo_id``, ``repo_type``, ``revision``, ``summary``,
      ``description``, ``added`` (paths), ``deleted`` (paths), ``oid``, ``query``.
    * ``requests``: every :class:`RecordedRequest` (method, path, query, headers, body).
    * ``unhandled``: requests to endpoints this fake does not implement (404).
    * ``errors``: internal errors of the fake (a test should expect this to be empty).

    Set ``gated`` (model ids) to have those answer 401 with ``X-Error-Code: GatedRepo`` to a request
    without the token, as the Hub answers a gated model the caller has no access to.
    """

    def __init__(self, token: str | None = None, user: str = "fake-user",
                 max_body_bytes: int = 512 * _MiB):
        self.token = token
        self.user = user
        self.max_body_bytes = max_body_bytes
        self._lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.committed: list[tuple[str, str, bytes]] = []
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.errors: list[str] = []
        self.gated: set[str] = set()  # model ids answered 401 GatedRepo (as the Hub does without access)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = 0

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        if self._server is not None:
            return self
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # stops serve_forever (returns within poll_interval)
        server.close_all_connections()  # drop keep-alive connections so handler threads end
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeHub is not running")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point a (sub)process's huggingface_hub at this server.

        ``HF_HUB_OFFLINE=0`` (not merely unset) also overrides an inherited ``TRANSFORMERS_OFFLINE=1``.
        """
        env = {"HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0"}
        if self.token:
            env["HF_TOKEN"] = self.token
        no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), "127.0.0.1", "localhost") if x)
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env

    # ------------------------------------------------------------------------------ queries
    @property
    def files(self) -> dict[str, dict[str, bytes]]:
        with self._lock:
            return {self._key(t, r): dict(repo.files) for (t, r), repo in self.repos.items()}

    def repo_files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos.get((repo_type, self._normalize(repo_id)))
            return dict(repo.files) if repo else {}

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self.repos[(repo_type, self._normalize(repo_id))].private

    @property
    def bodies(self) -> list[bytes]:
        """Every request body (decoded) in arrival order, for scanning."""
        with self._lock:
            return [r.body for r in self.requests]

    def endpoints_hit(self) -> list[str]:
        """``"METHOD /path"`` of every request, in arrival order."""
        with self._lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def authorizations(self) -> list[str | None]:
        with self._lock:
            return [r.authorization for r in self.requests]

    # ------------------------------------------------------------------------------ internals
    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def _record_error(self, msg: str) -> None:
        with self._lock:
            self.errors.append(msg)

    @staticmethod
    def _key(repo_type: str, repo_id: str) -> str:
        return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"

    def _normalize(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.user}/{repo_id}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _check_auth(self, rec: RecordedRequest) -> None:
        if self.token is None:
            return
        if rec.authorization != f"Bearer {self.token}":
            raise _HTTPError(401, "Invalid username or password.")

    def _get_repo(self, repo_type: str, repo_id: str, rec: RecordedRequest) -> _Repo:
        if self._normalize(repo_id) in self.gated and (self.token is None or rec.authorization != f"Bearer {self.token}"):
            raise _HTTPError(401, f"Access to model {repo_id} is restricted. You must have access to it and be "
                             "authenticated to access it. Please log in.", "GatedRepo")
        repo = self.repos.get((repo_type, self._normalize(repo_id)))
        if repo is None:
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        if repo.private:
            self._check_auth(rec)
        return repo

    @staticmethod
    def _json_body(rec: RecordedRequest) -> dict:
        try:
            obj = json.loads(rec.body.decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _HTTPError(400, f"invalid JSON body: {e}") from None
        if not isinstance(obj, dict):
            raise _HTTPError(400, "JSON body must be an object")
        return obj

    @staticmethod
    def _now() -> str:
        return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def _dispatch(self, h: _Handler, rec: RecordedRequest) -> None:
        m, path = rec.method, rec.path
        with self._lock:
            if m == "GET" and path == "/api/whoami-v2":
                return self._whoami(h, rec)
            if m == "GET" and path == "/api/agent-harnesses":
                return h._json(200, {"standardEnvVars": [], "harnesses": {}})
            if m == "POST" and path == "/api/repos/create":
                return self._create(h, rec)
            if m in ("POST", "DELETE") and path == "/api/repos/delete":
                return self._delete(h, rec)
            if m == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(h, rec)
            match = _API_REPO_RE.match(path)
            if match:
                repo_type = _REPO_TYPES[match["type"]]
                repo_id, action, rest = match["repo"], match["action"], match["rest"]
                if m == "POST" and action == "preupload" and rest:
                    return self._preupload(h, rec, repo_type, repo_id)
                if m == "POST" and action == "commit" and rest:
                    return self._commit(h, rec, repo_type, repo_id, unquote(rest))
                if m == "GET" and action is None:
                    return self._info(h, rec, repo_type, repo_id)
                if m == "GET" and action == "revision" and rest:
                    return self._info(h, rec, repo_type, repo_id)
                if m == "GET" and action == "tree" and rest:
                    return self._tree(h, rec, repo_type, repo_id, rest)
            match = _RESOLVE_RE.match(path)
            if match and m in ("GET", "HEAD"):
                repo_type = _REPO_TYPES.get(match["type"] or "models", "model")
                return self._resolve(h, rec, repo_type, match["repo"], unquote(match["file"]))
            self.unhandled.append(rec)
        raise _HTTPError(404, f"FakeHub does not implement {m} {path}")

    # ------------------------------------------------------------------------------ endpoints
    def _whoami(self, h: _Handler, rec: RecordedRequest) -> None:
        if rec.authorization is None or (self.token is not None and rec.authorization != f"Bearer {self.token}"):
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        h._json(200, {
            "type": "user", "id": "0" * 24, "name": self.user, "fullname": "Fake User",
            "email": None, "emailVerified": False, "isPro": False, "canPay": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
        })

    def _create(self, h: _Handler, rec: RecordedRequest) -> None:
        self._check_auth(rec)
        payload = self._json_body(rec)
        name = payload.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise _HTTPError(400, "invalid repo name")
        org = payload.get("organization") or self.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HTTPError(400, f"invalid repo type {repo_type!r}")
        visibility = payload.get("visibility")
        private = visibility == "private" if visibility is not None else bool(payload.get("private", False))
        repo_id = f"{org}/{name}"
        url = self._repo_url(repo_type, repo_id)
        exists = (repo_type, repo_id) in self.repos
        self.created.append({"repo_id": repo_id, "repo_type": repo_type, "private": private,
                             "visibility": visibility, "status": 409 if exists else 200, "payload": payload})
        if exists:
            raise _HTTPError(409, f"You already created this {repo_type} repo", extra={"url": url})
        now = self._now()
        self.repos[(repo_type, repo_id)] = _Repo(repo_id, repo_type, private, created_at=now, last_modified=now)
        h._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete(self, h: _Handler, rec: RecordedRequest) -> None:
        self._check_auth(rec)
        payload = self._json_body(rec)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        if self.repos.pop((repo_type, repo_id), None) is None:
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        h._json(200, {})

    def _validate_yaml(self, h: _Handler, rec: RecordedRequest) -> None:
        payload = self._json_body(rec)
        content = payload.get("content")
        if not isinstance(content, str):
            raise _HTTPError(400, "missing content")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if match:
            try:
                import yaml  # optional: only used to reject front matter the Hub would reject
            except ImportError:
                yaml = None
            if yaml is not None:
                try:
                    meta = yaml.safe_load(match.group(1))
                except yaml.YAMLError as e:
                    return h._send(400, f"Invalid YAML in README.md metadata: {e}".encode(), "text/plain")
                if meta is not None and not isinstance(meta, dict):
                    return h._send(400, b"README.md metadata must be a YAML mapping", "text/plain")
        h._json(200, {"errors": [], "warnings": []})

    def _preupload(self, h: _Handler, rec: RecordedRequest, repo_type: str, repo_id: str) -> None:
        self._check_auth(rec)
        repo = self._get_repo(repo_type, repo_id, rec)
        files = self._json_body(rec).get("files")
        if not isinstance(files, list):
            raise _HTTPError(400, "'files' must be a list")
        out = []
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                raise _HTTPError(400, "each file needs a 'path'")
            existing = repo.files.get(f["path"])
            out.append({
                "path": f["path"],
                "uploadMode": "regular",  # never LFS/Xet: content comes inline in the commit
                "shouldIgnore": False,
                "oid": git_blob_oid(existing) if existing is not None else None,
            })
        h._json(200, {"files": out, "commitOid": repo.sha})

    def _commit(self, h: _Handler, rec: RecordedRequest, repo_type: str, repo_id: str, revision: str) -> None:
        self._check_auth(rec)
        repo = self._get_repo(repo_type, repo_id, rec)
        lines = rec.body.splitlines()
        if not lines:
            raise _HTTPError(400, "empty commit payload")
        header: dict | None = None
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        deleted_folders: list[str] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as e:
                raise _HTTPError(400, f"bad NDJSON line {i}: {e!r}") from None
            if key == "header":
                header = value
            elif key == "file":
                path = value.get("path")
                if not isinstance(path, str) or not path or path.startswith("/"):
                    raise _HTTPError(400, f"bad file path on line {i}")
                encoding = (value.get("encoding") or "utf-8").lower()
                content = value.get("content", "")
                try:
                    data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
                except (ValueError, AttributeError) as e:
                    raise _HTTPError(400, f"bad content for {path}: {e}") from None
                added[path] = data
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"].rstrip("/"))
            elif key == "lfsFile":
                raise _HTTPError(400, "FakeHub only accepts regular (inline base64) files; got an lfsFile")
            else:
                raise _HTTPError(400, f"unknown commit operation {key!r}")
        if header is None or not isinstance(header, dict) or not header.get("summary"):
            raise _HTTPError(400, "commit header with a summary is required")
        for path in deleted:
            if path not in repo.files and path not in added:
                raise _HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
            repo.files.pop(path, None)
        for folder in deleted_folders:
            for path in [p for p in repo.files if p.startswith(folder + "/")]:
                del repo.files[path]
        repo.files.update(added)
        self._commit_counter += 1
        oid = hashlib.sha1(f"{repo_id}:{self._commit_counter}:{repo.sha}".encode() + rec.body).hexdigest()
        repo.sha = oid
        repo.last_modified = self._now()
        for path, data in added.items():
            self.committed.append((self._key(repo_type, repo.repo_id), path, data))
        self.commits.append({
            "repo_id": repo.repo_id, "repo_type": repo_type, "revision": revision,
            "summary": header.get("summary"), "description": header.get("description", ""),
            "added": list(added), "deleted": deleted + [f + "/" for f in deleted_folders], "oid": oid,
            "query": rec.query,
        })
        url = f"{self._repo_url(repo_type, repo.repo_id)}/commit/{oid}"
        pr_url = f"{self._repo_url(repo_type, repo.repo_id)}/discussions/1" if rec.query.get("create_pr") else None
        h._json(200, {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "",
                      "pullRequestUrl": pr_url})

    def _info(self, h: _Handler, rec: RecordedRequest, repo_type: str, repo_id: str) -> None:
        repo = self._get_repo(repo_type, repo_id, rec)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": repo.sha, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "createdAt": repo.created_at, "lastModified": repo.last_modified,
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
        }
        if repo_type == "model":
            info["modelId"] = repo.repo_id
        h._json(200, info)

    def _tree(self, h: _Handler, rec: RecordedRequest, repo_type: str, repo_id: str, rest: str) -> None:
        repo = self._get_repo(repo_type, repo_id, rec)
        _revision, _, sub = rest.partition("/")
        sub = unquote(sub).strip("/")
        recursive = rec.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{sub}/" if sub else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(repo.files.items()):
            if not path.startswith(prefix):
                continue
            rel_parts = path[len(prefix):].split("/")
            for depth in range(1, len(rel_parts)):  # folders on the way
                folder = prefix + "/".join(rel_parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
            if recursive or len(rel_parts) == 1:
                entries[path] = {"type": "file", "path": path, "oid": git_blob_oid(data), "size": len(data)}
        if sub and not entries:
            raise _HTTPError(404, "Entry not found", "EntryNotFound")
        h._json(200, list(entries.values()))

    def _resolve(self, h: _Handler, rec: RecordedRequest, repo_type: str, repo_id: str, filename: str) -> None:
        repo = self._get_repo(repo_type, repo_id, rec)
        data = repo.files.get(filename)
        if data is None:
            raise _HTTPError(404, "Entry not found", "EntryNotFound")
        etag = f'"{git_blob_oid(data)}"'
        h._send(200, data, "application/octet-stream", {"ETag": etag, "X-Repo-Commit": repo.sha})


# ---------------------------------------------------------------------------------- secret scan
_SCAN_MAX_DECOMPRESSED = 256 * _MiB


def _needles(secret: str) -> list[bytes]:
    """Byte patterns whose presence means the secret is there: UTF-8, UTF-16, and base64 at any
    of the 3 byte alignments (the stable middle of the encoding, so it matches inside a longer
    base64 blob such as a commit payload)."""
    raw = secret.encode("utf-8")
    needles = [raw, secret.encode("utf-16-le")]
    if len(raw) >= 6:
        for shift in range(3):
            enc = base64.b64encode(b"\0" * shift + raw)
            start = 4 if shift else 0  # drop the quantum that contains the padding bytes
            end = len(enc) - 4  # drop the last quantum (depends on what follows)
            core = enc[start:end]
            if len(core) >= 8:
                needles.append(core)
                needles.append(core.replace(b"+", b"-").replace(b"/", b"_"))  # urlsafe
    return needles


def _contains(data: bytes, needles: Sequence[bytes], depth: int = 0) -> bool:
    if any(n in data for n in needles):
        return True
    if depth >= 2:
        return False
    # gzip (e.g. gzip'ed tensorboard events, .gz logs): search the decompressed bytes too
    if data[:2] == b"\x1f\x8b":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(data, _SCAN_MAX_DECOMPRESSED)
            # concatenated gzip members
            while d.eof and d.unused_data and len(out) < _SCAN_MAX_DECOMPRESSED:
                rest = d.unused_data
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out += d.decompress(rest, _SCAN_MAX_DECOMPRESSED - len(out))
            if _contains(out, needles, depth + 1):
                return True
        except (zlib.error, EOFError):
            pass
    # zip archives (torch .pt/.bin checkpoints, .npz): entries may be deflated
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                budget = _SCAN_MAX_DECOMPRESSED
                for info in zf.infolist():
                    if info.file_size > budget:
                        break
                    budget -= info.file_size
                    if _contains(zf.read(info), needles, depth + 1):
                        return True
        except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error):
            pass
    return False


def scan_for_secret(root: Path, secret: str, extra_texts: Iterable[str | bytes] = ()) -> list[str]:
    """Return every file under ``root`` and every extra text that contains ``secret``.

    Files are read as bytes (binary-safe: safetensors, tensorboard event files, images, ...),
    hidden files and folders included, symlinks not followed into directories. A match is the
    secret in UTF-8 or UTF-16-LE, base64/urlsafe-base64 of it (at any alignment), or any of these
    inside gzip data (``.gz``, gzip'ed event files) or inside zip archives (``.pt``/``.npz``).

    Returned: the file paths (``str``), then ``"extra_texts[i]"`` for each matching extra text.
    ``root`` may be a single file or may not exist (then only ``extra_texts`` are scanned).
    """
    if not secret:
        raise ValueError("secret must be a non-empty string")
    needles = _needles(secret)
    hits: list[str] = []
    root = Path(root)
    paths: list[Path] = []
    if root.is_file():
        paths.append(root)
    elif root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                paths.append(Path(dirpath) / name)
    for path in paths:
        try:
            if not path.is_file():  # broken symlink, fifo, socket...
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if _contains(data, needles):
            hits.append(str(path))
    for i, text in enumerate(extra_texts):
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
        if _contains(data, needles):
            hits.append(f"extra_texts[{i}]")
    return hits
