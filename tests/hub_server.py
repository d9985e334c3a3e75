"""A fake Hugging Face Hub for tests: serves local folders as model repos on 127.0.0.1.

The server speaks the subset of the Hub protocol that huggingface_hub 2.4 uses for
`hf_hub_download`, `snapshot_download` and `PyTorchModelHubMixin.from_pretrained`
(see ../shared/docs/hub-protocol.md):

- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` with ``X-Repo-Commit``, a quoted
  ``ETag`` (sha256 of the served bytes) and ``Content-Length``; HEAD sends the same headers and no body;
- ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}`` -> JSON with
  ``id``, ``sha`` and ``siblings``;
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=...&expand=...`` -> a one-page
  JSON list of ``{"type": "file", "path", "size", "oid"}`` and ``{"type": "directory", ...}``.

It also takes uploads the way ``HfApi.create_repo`` and ``HfApi.upload_folder``/``create_commit`` send
them with Xet disabled (``HF_HUB_DISABLE_XET=1``; with Xet on, the client would ask for a Xet token,
which this server does not give). Every write needs an ``Authorization: Bearer ...`` header (401 without):

- ``POST /api/repos/create`` (``{"name", "organization", "type", "sdk", ...}``) -> ``{"url", "name"}``,
  409 when the repo exists (``exist_ok=True`` accepts that);
- ``POST /api/validate-yaml`` checks a README's front matter (a Space needs ``sdk``; ``python_version``
  must be a YAML string, since ``3.10`` would read as the float 3.1);
- ``POST /api/{type}s/{repo}/preupload/{rev}`` answers ``uploadMode`` per file: ``"lfs"`` when the
  512-byte sample holds a NUL byte (git's binary test), the file is over 10 MiB, or a ``filter=lfs``
  rule of the ``.gitattributes`` already committed matches; ``"regular"`` otherwise;
- ``POST /{prefix}{repo}.git/info/lfs/objects/batch`` (LFS batch API, ``basic`` transfer) answers an
  upload href per object not stored yet, and ``PUT`` on that href stores the bytes after checking
  their sha256 and size;
- ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON: ``header``, ``file``, ``lfsFile``,
  ``deletedFile``, ``deletedFolder``) writes the repo's folder. Like the Hub, it rejects a regular file
  that is binary or over 10 MiB, and an ``lfsFile`` whose object was not uploaded.

`HubServer.uploaded` returns what arrived: the files, each marked ``"lfs"`` or ``"regular"``, the
commits and the repo's folder. A created model repo is also served for download. Uploads are bounded
(MAX_BODY_BYTES per request, MAX_UPLOAD_BYTES in all) and kept in ``upload_dir``.

Any query string is accepted and only ``recursive`` is interpreted. ``Range`` headers are ignored
(a full 200 answer is sent), which the client handles by restarting the download.

The fake commit sha is the sha1 of the repo id and of every served file's path and content, so it
is deterministic, and it changes when a ``truncate_file`` or ``missing`` fault changes what is served
(as a real fixing commit would), which lets a healed retry fetch the good file again.

Faults are set per repo with `HubServer.set_fault` and removed with `HubServer.clear_fault`.

The Hub client reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and its timeouts once, at
import. Run it in a subprocess with `run_hub_client` (or `HubServer.run_client`), or in-process
inside `patched_hub_client`, which patches ``huggingface_hub.constants``.

Keep-alive: stopping the server closes the connections it holds, but a client in the same process
should still call ``huggingface_hub.close_session()`` after `HubServer.stop` to drop its pooled
connections and simulate a server that went away.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

logger = logging.getLogger(__name__)

FAULT_KINDS = ("not_found", "gated", "server_error", "cut", "slow", "drop", "truncate_file", "missing")
"""Fault kinds accepted by `HubServer.set_fault`."""

MAX_SLOW_SECONDS = 30.0
"""Upper bound on the delay of a ``slow`` fault, so that no handler blocks for long."""

UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"
"""Endpoint used by `run_hub_client` when none is given: nothing listens there (the discard port)."""

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request body the server reads (an upload PUT or a commit); a larger one is refused with 413."""

MAX_UPLOAD_BYTES = 512 * 1024 * 1024
"""Bytes the server stores for uploads in all (LFS objects and committed files); past it, 413."""

REGULAR_MAX_BYTES = 10 * 1024 * 1024
"""A file over this size must be a large file (LFS), as on the Hub."""

REPO_TYPES = ("model", "dataset", "space")
"""Repo types accepted by the upload routes."""

REPO_ROOT = Path(__file__).resolve().parents[1]
_RESULT_MARKER = "__HUB_CLIENT_RESULT__ "
_CHUNK_SIZE = 64 * 1024
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_RE = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<op>revision|tree)/(?P<rev>[^/]+)(?:/(?P<sub>.+?))?)?/?$"
)
_BINARY_SNIFF_BYTES = 8000  # git calls a file binary when a NUL byte is among its first 8000 bytes
_LFS_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_WRITE_API_RE = re.compile(
    r"^/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/(?P<rev>[^/]+)$"
)
_LFS_BATCH_RE = re.compile(r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT_RE = re.compile(r"^/fake-lfs/(?P<oid>[0-9a-f]{64})$")
_OID_RE = re.compile(r"^[0-9a-f]{64}$")
# Fault kinds that answer instead of the repo (checked in this order), and those tied to one file.
_ANSWERING_FAULTS = ("drop", "not_found", "gated", "server_error")
_FILE_FAULTS = ("truncate_file", "missing")


class HubRequest(NamedTuple):
    """One request received by the server, logged on arrival."""

    method: str  # "GET", "HEAD", "POST" or "PUT"
    path: str  # URL path, still percent-encoded, without the query string
    query: str  # raw query string, "" when absent


@dataclass
class _Fault:
    """A fault set on one repo; ``remaining`` is None for a fault that lasts until cleared."""

    kind: str
    filename: str | None
    seconds: float
    nbytes: int | None
    status: int
    methods: frozenset[str]
    remaining: int | None


@dataclass
class _Repo:
    """A registered repo: its folder and its faults keyed by (kind, filename)."""

    repo_id: str
    folder: Path
    faults: dict[tuple[str, str | None], _Fault] = field(default_factory=dict)


@dataclass(frozen=True)
class HubCommit:
    """One commit received by the upload routes.

    Attributes:
        oid: the fake commit sha (40 hex).
        summary: the commit title.
        files: the paths it added, each ``"lfs"`` (an ``lfsFile`` line: the bytes went up through the LFS
            batch API) or ``"regular"`` (a ``file`` line: the bytes were inside the commit).
        deleted: the paths it deleted (files and folders).
    """

    oid: str
    summary: str
    files: dict[str, str]
    deleted: tuple[str, ...]


@dataclass
class UploadedRepo:
    """A repo created through ``POST /api/repos/create`` and what was committed to it.

    Attributes:
        repo_type: "model", "dataset" or "space".
        repo_id: "org/name".
        folder: where its files are written (a model repo is also served from there).
        sdk: the Space SDK given at creation (None for other types).
        private: whether it was created private.
        files: the files it holds now, each ``"lfs"`` or ``"regular"`` as it last arrived.
        commits: its commits, oldest first.
    """

    repo_type: str
    repo_id: str
    folder: Path
    sdk: str | None
    private: bool
    files: dict[str, str] = field(default_factory=dict)
    commits: list[HubCommit] = field(default_factory=list)

    @property
    def lfs_files(self) -> list[str]:
        """The files it holds that arrived as large files, sorted."""
        return sorted(path for path, mode in self.files.items() if mode == "lfs")


class _WriteError(Exception):
    """An upload request the server refuses: sent as a Hub-style error."""

    def __init__(self, status: int, message: str, error_code: str | None = None,
                 extra_body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra_body = extra_body


@dataclass(frozen=True)
class _ServedFile:
    """A file as the server serves it: maybe truncated to ``size`` bytes."""

    path: str  # posix path inside the repo
    source: Path
    size: int
    sha256: str
    git_sha1: str


@dataclass(frozen=True)
class _Snapshot:
    """What a repo serves right now: its files and the commit sha derived from them."""

    files: dict[str, _ServedFile]
    commit: str


@dataclass(frozen=True)
class _Route:
    """A parsed request path."""

    kind: str  # "resolve", "info" or "tree"
    repo_id: str
    revision: str
    filename: str | None = None  # resolve: file path; tree: sub-folder or None


class _Server(ThreadingHTTPServer):
    """Threading HTTP server that tracks its connections and handler threads so stop() can end them."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], hub: HubServer, idle_timeout: float) -> None:
        self.hub = hub
        self.idle_timeout = idle_timeout
        self._track_lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.handler_threads: set[threading.Thread] = set()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve one connection on its own daemon thread, remembering the socket and the thread."""
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True, name="fake-hub-handler"
        )
        with self._track_lock:
            self.connections.add(request)
            self.handler_threads.add(thread)
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run the handler, then forget the thread."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._track_lock:
                self.handler_threads.discard(threading.current_thread())

    def shutdown_request(self, request: Any) -> None:
        """Close one connection and forget it."""
        with self._track_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log handler errors instead of printing them; connection drops are expected and stay quiet."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.debug("fake hub: connection from %s ended: %r", client_address, error)
        else:
            logger.exception("fake hub: error while serving %s", client_address)

    def close_connections(self) -> None:
        """Shut down every open connection so blocked reads and pooled client connections end now."""
        with self._track_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds in total for the handler threads to finish."""
        with self._track_lock:
            threads = list(self.handler_threads)
        for thread in threads:
            thread.join(timeout / max(len(threads), 1))


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler that forwards every request to `HubServer._serve`."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        """Bound idle keep-alive reads by the server's idle timeout."""
        self.timeout = self.server.idle_timeout
        super().setup()

    def handle(self) -> None:
        """Serve requests, ignoring clients that hang up or time out mid-answer."""
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True
        except OSError as error:  # e.g. the socket was shut down by HubServer.stop()
            logger.debug("fake hub: connection closed: %r", error)
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        """Answer a GET."""
        self.server.hub._serve(self, "GET")

    def do_HEAD(self) -> None:  # noqa: N802 (stdlib naming)
        """Answer a HEAD with the GET headers and no body."""
        self.server.hub._serve(self, "HEAD")

    def do_POST(self) -> None:  # noqa: N802 (stdlib naming)
        """Answer an upload API call."""
        self.server.hub._serve_write(self, "POST")

    def do_PUT(self) -> None:  # noqa: N802 (stdlib naming)
        """Store an LFS object."""
        self.server.hub._serve_write(self, "PUT")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Send the stdlib access log to `logging` instead of stderr."""
        logger.debug("fake hub: " + format, *args)


class HubServer:
    """A fake Hugging Face Hub serving local folders as model repos, with per-repo fault injection.

    Use it as a context manager (or call `start` and `stop`)::

        with HubServer() as hub:
            hub.add_repo("org/name", folder)
            result = hub.run_client("from huggingface_hub import hf_hub_download\\n"
                                    "emit(path=hf_hub_download('org/name', 'config.json'))",
                                    hf_home=tmp_path / "hf")

    After `stop`, call ``huggingface_hub.close_session()`` in any process that talked to the server
    (the subprocesses of `run_hub_client` exit, so only in-process clients need it): the client keeps
    keep-alive connections in a pool, and the server going down is only simulated once those are dropped.

    Args:
        idle_timeout: seconds an idle keep-alive connection is kept open by the server.
        upload_dir: where uploaded repos and LFS objects are stored; a temporary folder removed with the
            server object when None.
    """

    def __init__(self, *, idle_timeout: float = 60.0, upload_dir: str | os.PathLike[str] | None = None) -> None:
        self._idle_timeout = idle_timeout
        self._upload_tmp = tempfile.TemporaryDirectory(prefix="fake-hub-uploads-") if upload_dir is None else None
        self._upload_dir = Path(self._upload_tmp.name if self._upload_tmp is not None else upload_dir).resolve()
        self._uploads: dict[tuple[str, str], UploadedRepo] = {}
        self._lfs_objects: dict[str, Path] = {}  # sha256 -> stored bytes
        self._lfs_expected: dict[str, tuple[int, str]] = {}  # sha256 -> (size, signature of its upload href)
        self._upload_bytes = 0
        self._commit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._log: list[HubRequest] = []
        self._hash_cache: dict[tuple[str, int, int, int | None], tuple[str, str]] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        """Start serving on 127.0.0.1; a restarted server reuses its previous port.

        Returns:
            The server itself, for chaining.
        """
        if self._server is not None:
            raise RuntimeError("The fake hub is already running; call stop() before start().")
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), self, self._idle_timeout)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fake-hub"
        )
        self._thread.start()
        logger.debug("fake hub listening on %s", self.endpoint)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: close the listening socket and every open connection, and wake slow handlers.

        Clients in this process must still call ``huggingface_hub.close_session()``, see the class docstring.

        Args:
            timeout: seconds to wait for the handler threads to finish.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        thread.join(timeout)
        server.close_connections()
        server.server_close()
        server.join_handlers(timeout)
        self._server = None
        self._thread = None

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._server is not None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port (0 before the first start)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """The value for ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:41234``."""
        if self._port == 0:
            raise RuntimeError("The fake hub has no port yet; call start() first.")
        return f"http://127.0.0.1:{self._port}"

    # ----------------------------------------------------------------- repos
    def add_repo(self, repo_id: str, folder: str | os.PathLike[str]) -> None:
        """Serve ``folder`` as the model repo ``repo_id`` (replacing any repo of that id and its faults).

        Files are read at request time, so later edits to the folder are served.

        Args:
            repo_id: ``"org/name"`` (or ``"name"``).
            folder: an existing directory laid out like the repo.
        """
        if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id):
            raise ValueError(f"Invalid repo id {repo_id!r}: use 'org/name' with letters, digits, '-', '_' or '.'.")
        path = Path(folder).resolve()
        if not path.is_dir():
            raise ValueError(f"Cannot serve repo {repo_id!r}: {path} is not a directory.")
        with self._lock:
            self._repos[repo_id] = _Repo(repo_id=repo_id, folder=path)

    def remove_repo(self, repo_id: str) -> None:
        """Stop serving ``repo_id``; it then answers 404 RepoNotFound."""
        with self._lock:
            self._repos.pop(repo_id, None)

    def commit_sha(self, repo_id: str) -> str:
        """The 40-hex commit sha ``repo_id`` serves right now (it depends on the served content)."""
        return self._snapshot(self._get_repo(repo_id)).commit

    def etag(self, repo_id: str, filename: str) -> str:
        """The unquoted ETag of ``filename`` as served now: the name of its blob in the client's cache."""
        snapshot = self._snapshot(self._get_repo(repo_id))
        if filename not in snapshot.files:
            raise KeyError(f"Repo {repo_id!r} serves no file {filename!r}; it serves {sorted(snapshot.files)}.")
        return snapshot.files[filename].sha256

    # ----------------------------------------------------------------- faults
    def set_fault(
        self,
        repo_id: str,
        kind: str,
        *,
        filename: str | None = None,
        seconds: float = 0.0,
        nbytes: int | None = None,
        status: int | None = None,
        methods: str | tuple[str, ...] | None = None,
        times: int | None = None,
    ) -> None:
        """Make ``repo_id`` misbehave until `clear_fault` (or for ``times`` requests).

        Kinds (see FAULT_KINDS):

        - ``not_found``: 404 with ``X-Error-Code: RepoNotFound``;
        - ``gated``: ``status`` 403 (default) or 401 with ``X-Error-Code: GatedRepo``;
        - ``server_error``: ``status`` 500 (default) or any 5xx;
        - ``drop``: close the connection without answering;
        - ``slow``: wait ``seconds`` (at most MAX_SLOW_SECONDS, cut short by stop()) before answering;
        - ``cut``: on a file GET, announce the full Content-Length, send ``nbytes`` (default half the
          file) and close the connection;
        - ``truncate_file``: serve ``filename`` truncated to ``nbytes`` with consistent headers, tree
          listing and commit sha, as if the stored file itself were truncated;
        - ``missing``: ``filename`` answers 404 ``X-Error-Code: EntryNotFound`` (with ``X-Repo-Commit``)
          and is left out of the listings.

        A fault with ``filename`` applies only to that file's resolve requests; without it,
        ``not_found``/``gated``/``server_error``/``drop``/``slow`` apply to every request for the repo
        (API calls included) and ``cut`` to every file. Setting a fault of the same kind and filename
        replaces the previous one.

        Args:
            repo_id: a repo added with `add_repo`.
            kind: one of FAULT_KINDS.
            filename: file path inside the repo; required for ``truncate_file`` and ``missing``.
            seconds: delay for ``slow``.
            nbytes: bytes kept by ``cut`` (default: half the file) and ``truncate_file`` (required).
            status: HTTP status for ``gated`` (401/403) and ``server_error`` (5xx).
            methods: "GET", "HEAD" or both (default both); ``cut`` only ever applies to GET.
            times: fire on this many matching requests, then clear itself; None lasts until cleared.
        """
        repo = self._get_repo(repo_id)
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault kind {kind!r}; use one of {FAULT_KINDS}.")
        if kind in _FILE_FAULTS and filename is None:
            raise ValueError(f"Fault {kind!r} needs filename= (the file to {kind.split('_')[0]}).")
        if kind in _FILE_FAULTS and times is not None:
            raise ValueError(f"Fault {kind!r} changes what the repo stores; it takes no times=, clear it instead.")
        if times is not None and times < 1:
            raise ValueError(f"times={times} must be a positive count, or None for a lasting fault.")
        if kind == "slow" and not 0 < seconds <= MAX_SLOW_SECONDS:
            raise ValueError(f"A slow fault needs 0 < seconds <= {MAX_SLOW_SECONDS}, got seconds={seconds}.")
        if kind == "truncate_file":
            source = _file_in_folder(repo.folder, filename)
            size = source.stat().st_size if source is not None else None
            if size is None or nbytes is None or not 0 <= nbytes < size:
                raise ValueError(
                    f"truncate_file needs an existing file and 0 <= nbytes < its size; got filename={filename!r} "
                    f"(size {size}) and nbytes={nbytes}."
                )
        if kind == "cut" and nbytes is not None and nbytes < 0:
            raise ValueError(f"cut needs nbytes >= 0 (bytes sent before closing), got {nbytes}.")
        default_status = {"gated": 403, "server_error": 500, "not_found": 404}.get(kind, 0)
        status = default_status if status is None else status
        if kind == "gated" and status not in (401, 403):
            raise ValueError(f"A gated fault answers 401 or 403, got status={status}.")
        if kind == "server_error" and not 500 <= status <= 599:
            raise ValueError(f"A server_error fault answers a 5xx status, got status={status}.")
        if methods is None:
            methods = ("GET", "HEAD")
        method_set = frozenset((methods,) if isinstance(methods, str) else methods)
        if not method_set or not method_set <= {"GET", "HEAD"}:
            raise ValueError(f"methods must be 'GET', 'HEAD' or both, got {methods!r}.")
        fault = _Fault(kind, filename, float(seconds), nbytes, status, method_set, times)
        with self._lock:
            repo.faults[(kind, filename)] = fault

    def clear_fault(self, repo_id: str, kind: str | None = None) -> None:
        """Heal ``repo_id``: remove its faults of ``kind`` (all its faults when kind is None)."""
        repo = self._get_repo(repo_id)
        with self._lock:
            for key in [key for key in repo.faults if kind is None or key[0] == kind]:
                del repo.faults[key]

    def clear_faults(self) -> None:
        """Heal every repo."""
        with self._lock:
            for repo in self._repos.values():
                repo.faults.clear()

    # ----------------------------------------------------------------- request log
    @property
    def requests(self) -> list[HubRequest]:
        """A copy of the requests received so far, in arrival order."""
        with self._lock:
            return list(self._log)

    @property
    def request_count(self) -> int:
        """How many requests were received so far."""
        with self._lock:
            return len(self._log)

    def reset_log(self) -> None:
        """Forget the logged requests."""
        with self._lock:
            self._log.clear()

    # ----------------------------------------------------------------- uploads
    def uploaded(self, repo_id: str, repo_type: str = "model") -> UploadedRepo:
        """What was uploaded to ``repo_id`` (a copy: later commits do not change it).

        Raises:
            KeyError: no such repo was created through ``POST /api/repos/create``.
        """
        with self._lock:
            repo = self._uploads.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"No {repo_type} repo {repo_id!r} was created; created: {sorted(self._uploads)}.")
            return UploadedRepo(
                repo.repo_type, repo.repo_id, repo.folder, repo.sdk, repo.private, dict(repo.files), list(repo.commits)
            )

    # ----------------------------------------------------------------- client helper
    def run_client(self, code: str, *, hf_home: str | os.PathLike[str], **kwargs: Any) -> HubClientResult:
        """Run `run_hub_client` against this server; takes the same keyword arguments."""
        return run_hub_client(code, endpoint=self.endpoint, hf_home=hf_home, **kwargs)

    # ----------------------------------------------------------------- internals
    def _get_repo(self, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise KeyError(f"Unknown repo {repo_id!r}; add it first with add_repo().")
        return repo

    def _hashes(self, source: Path, limit: int | None) -> tuple[str, str]:
        """(sha256, git blob sha1) of the first ``limit`` bytes of ``source`` (all when None), cached by stat."""
        stat = source.stat()
        key = (str(source), stat.st_size, stat.st_mtime_ns, limit)
        with self._lock:
            cached = self._hash_cache.get(key)
        if cached is not None:
            return cached
        size = stat.st_size if limit is None else min(limit, stat.st_size)
        sha256, sha1 = hashlib.sha256(), hashlib.sha1()
        sha1.update(f"blob {size}\0".encode())
        with source.open("rb") as handle:
            left = size
            while left > 0:
                chunk = handle.read(min(_CHUNK_SIZE, left))
                if not chunk:
                    break
                sha256.update(chunk)
                sha1.update(chunk)
                left -= len(chunk)
        digests = (sha256.hexdigest(), sha1.hexdigest())
        with self._lock:
            self._hash_cache[key] = digests
        return digests

    def _snapshot(self, repo: _Repo) -> _Snapshot:
        """List the files ``repo`` serves now, applying file faults, and derive its commit sha."""
        with self._lock:
            faults = list(repo.faults.values())
        missing = {f.filename for f in faults if f.kind == "missing"}
        truncated = {f.filename: f.nbytes for f in faults if f.kind == "truncate_file"}
        files: dict[str, _ServedFile] = {}
        for source in sorted(repo.folder.rglob("*")):
            if not source.is_file():
                continue
            rel = source.relative_to(repo.folder).as_posix()
            if rel in missing:
                continue
            limit = truncated.get(rel)
            sha256, git_sha1 = self._hashes(source, limit)
            size = source.stat().st_size if limit is None else min(limit, source.stat().st_size)
            files[rel] = _ServedFile(rel, source, size, sha256, git_sha1)
        commit = hashlib.sha1(repo.repo_id.encode())
        for rel, served in files.items():
            commit.update(f"\0{rel}\0{served.sha256}".encode())
        return _Snapshot(files=files, commit=commit.hexdigest())

    def _take_faults(self, repo: _Repo, route: _Route, method: str) -> dict[str, _Fault]:
        """The request-level faults that fire for this request, by kind; uses up counted faults."""
        fired: dict[str, _Fault] = {}
        with self._lock:
            for key, fault in list(repo.faults.items()):
                if fault.kind in _FILE_FAULTS or method not in fault.methods or fault.kind in fired:
                    continue
                if fault.filename is not None and (route.kind != "resolve" or route.filename != fault.filename):
                    continue
                if fault.kind == "cut" and (route.kind != "resolve" or method != "GET"):
                    continue
                fired[fault.kind] = fault
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        del repo.faults[key]
        return fired

    def _serve(self, handler: _Handler, method: str) -> None:
        """Answer one request (called on a handler thread)."""
        split = urlsplit(handler.path)
        with self._lock:
            self._log.append(HubRequest(method, split.path, split.query))
        route = _parse_route(split.path)
        if route is None:
            _send_error(handler, method, 404, None, f"No such route: {split.path}")
            return
        with self._lock:
            repo = self._repos.get(route.repo_id)
        if repo is None:
            _send_error(handler, method, 404, "RepoNotFound", f"Repository {route.repo_id} not found.")
            return
        fired = self._take_faults(repo, route, method)
        if "slow" in fired:
            self._stopping.wait(fired["slow"].seconds)
            if self._stopping.is_set():
                handler.close_connection = True
                return
        if "drop" in fired:
            handler.close_connection = True
            return
        if "not_found" in fired:
            _send_error(handler, method, 404, "RepoNotFound", f"Repository {repo.repo_id} not found.")
            return
        if "gated" in fired:
            status = fired["gated"].status
            _send_error(handler, method, status, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
            return
        if "server_error" in fired:
            _send_error(handler, method, fired["server_error"].status, None, "Internal Error (fake hub fault).")
            return
        snapshot = self._snapshot(repo)
        if route.revision not in ("main", snapshot.commit):
            _send_error(handler, method, 404, "RevisionNotFound", f"Invalid rev id: {route.revision}")
            return
        if route.kind == "info":
            _send_json(handler, method, _info_json(repo.repo_id, snapshot))
        elif route.kind == "tree":
            query = parse_qs(split.query)
            recursive = query.get("recursive", ["false"])[-1].lower() in ("true", "1")
            entries = _tree_json(snapshot, route.filename, recursive)
            if entries is None:
                _send_error(handler, method, 404, "EntryNotFound", f"{route.filename} does not exist on main")
            else:
                _send_json(handler, method, entries)
        else:
            self._send_file(handler, method, snapshot, route, fired.get("cut"))

    def _send_file(
        self, handler: _Handler, method: str, snapshot: _Snapshot, route: _Route, cut: _Fault | None
    ) -> None:
        """Send a resolve answer: headers always, the body on GET (cut short by a ``cut`` fault)."""
        served = snapshot.files.get(route.filename or "")
        if served is None:
            _send_error(
                handler,
                method,
                404,
                "EntryNotFound",
                f"{route.filename} does not exist on {route.revision}",
                extra_headers={"X-Repo-Commit": snapshot.commit},
            )
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(served.size))
        handler.send_header("ETag", f'"{served.sha256}"')
        handler.send_header("X-Repo-Commit", snapshot.commit)
        if cut is not None:
            handler.send_header("Connection", "close")
        handler.end_headers()
        if method == "HEAD":
            return
        to_send = served.size
        if cut is not None:
            to_send = min(served.size, served.size // 2 if cut.nbytes is None else cut.nbytes)
            handler.close_connection = True
        with served.source.open("rb") as source:
            while to_send > 0:
                chunk = source.read(min(_CHUNK_SIZE, to_send))
                if not chunk:
                    break
                handler.wfile.write(chunk)
                to_send -= len(chunk)
        handler.wfile.flush()

    # ----------------------------------------------------------------- upload routes
    def _serve_write(self, handler: _Handler, method: str) -> None:
        """Answer a POST (upload API) or a PUT (LFS object) (called on a handler thread)."""
        split = urlsplit(handler.path)
        with self._lock:
            self._log.append(HubRequest(method, split.path, split.query))
        try:
            body = _read_body(handler)
            put = _LFS_PUT_RE.match(split.path)
            if method == "PUT" and put is not None:  # the signed href stands in for a presigned S3 URL: no token
                self._store_lfs_object(put["oid"], parse_qs(split.query).get("sig", [""])[-1], body)
                handler.send_response(200)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            if method != "POST":
                raise _WriteError(405, f"{method} is not allowed on {split.path}.")
            if not handler.headers.get("Authorization", "").startswith("Bearer "):
                raise _WriteError(401, "Invalid credentials in Authorization header (log in with `hf auth login`).")
            if split.path == "/api/repos/create":
                _send_json(handler, method, self._create_repo(_json_body(body)))
            elif split.path == "/api/validate-yaml":
                errors = _front_matter_errors(_json_body(body))
                _send_json(handler, method, {"errors": [{"message": e} for e in errors], "warnings": []},
                           status=400 if errors else 200)
            elif (match := _WRITE_API_RE.match(split.path)) is not None:
                if parse_qs(split.query).get("create_pr", ["0"])[-1] not in ("0", ""):
                    raise _WriteError(400, "The fake hub does not open pull requests.")
                repo = self._upload_repo(match["type"], unquote(match["repo"]), unquote(match["rev"]))
                if match["op"] == "preupload":
                    _send_json(handler, method, self._preupload(repo, _json_body(body)))
                else:
                    _send_json(handler, method, self._commit(repo, body))
            elif (match := _LFS_BATCH_RE.match(split.path)) is not None:
                repo_type = {"datasets": "dataset", "spaces": "space", None: "model"}[match["prefix"]]
                repo = self._upload_repo(repo_type, unquote(match["repo"]), "main")
                _send_json(handler, method, self._lfs_batch(repo, _json_body(body)))
            else:
                raise _WriteError(404, f"No such route: {method} {split.path}")
        except _WriteError as error:
            _send_error(handler, method, error.status, error.error_code, error.message, extra_body=error.extra_body)

    def _create_repo(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/repos/create``: make an empty repo (409 when it exists)."""
        repo_type = payload.get("type") or "model"
        name, namespace = payload.get("name"), payload.get("organization")
        repo_id = f"{namespace}/{name}"
        if repo_type not in REPO_TYPES:
            raise _WriteError(400, f"Invalid repo type {repo_type!r}; use one of {REPO_TYPES}.")
        if not isinstance(name, str) or not isinstance(namespace, str) or not _REPO_ID_RE.match(repo_id):
            raise _WriteError(400, f"Invalid repo name {repo_id!r}: the fake hub needs 'namespace/name'.")
        sdk = payload.get("sdk")
        if repo_type == "space" and sdk not in ("gradio", "docker", "static"):
            raise _WriteError(400, f"A Space needs sdk 'gradio', 'docker' or 'static', got {sdk!r}.")
        url = f"{self.endpoint}/{_LFS_PREFIXES[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._uploads:
                raise _WriteError(409, f"You already created this {repo_type} repo: {url}", extra_body={"url": url})
            folder = self._upload_dir / f"{repo_type}s" / repo_id
            folder.mkdir(parents=True)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self._uploads[(repo_type, repo_id)] = UploadedRepo(repo_type, repo_id, folder, sdk, private)
            if repo_type == "model":
                self._repos[repo_id] = _Repo(repo_id=repo_id, folder=folder)
        return {"url": url, "name": repo_id, "id": repo_id}

    def _upload_repo(self, repo_type: str, repo_id: str, revision: str) -> UploadedRepo:
        """The created repo an upload route names (404 RepoNotFound / RevisionNotFound otherwise)."""
        with self._lock:
            repo = self._uploads.get((repo_type, repo_id))
        if repo is None:
            raise _WriteError(404, f"Repository {repo_type}s/{repo_id} not found.", "RepoNotFound")
        if revision != "main":
            raise _WriteError(404, f"Invalid rev id: {revision} (the fake hub has only main).", "RevisionNotFound")
        return repo

    def _preupload(self, repo: UploadedRepo, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``preupload``: say per file whether it goes up as a large file or inside the commit."""
        files = payload.get("files")
        if not isinstance(files, list):
            raise _WriteError(400, "preupload needs a 'files' list.")
        lfs_patterns = _lfs_patterns(repo.folder / ".gitattributes")
        answer = []
        for entry in files:
            try:
                path, size = _repo_path(entry["path"]), int(entry["size"])
                sample = base64.b64decode(entry["sample"], validate=True)
            except (KeyError, TypeError, ValueError) as error:
                raise _WriteError(400, f"Malformed preupload entry {entry!r}: {error}") from None
            large = size > REGULAR_MAX_BYTES or b"\0" in sample or _matches_any(path, lfs_patterns)
            answer.append({"path": path, "uploadMode": "lfs" if large else "regular", "shouldIgnore": False, "oid": None})
        return {"files": answer}

    def _lfs_batch(self, repo: UploadedRepo, payload: Mapping[str, Any]) -> dict[str, Any]:
        """LFS batch API: an upload href for each object not stored yet (basic transfer only)."""
        if payload.get("operation") != "upload" or "basic" not in (payload.get("transfers") or ["basic"]):
            raise _WriteError(400, "The fake hub takes LFS uploads with the basic transfer only.")
        objects = []
        for entry in payload.get("objects") or []:
            oid, size = entry.get("oid"), entry.get("size")
            if not isinstance(oid, str) or not _OID_RE.match(oid) or not isinstance(size, int) or size < 0:
                raise _WriteError(400, f"Malformed LFS object {entry!r}: oid is a sha256 in hex, size an int >= 0.")
            with self._lock:
                stored = oid in self._lfs_objects
                if not stored:
                    signature = self._lfs_expected.get(oid, (size, secrets.token_hex(8)))[1]
                    self._lfs_expected[oid] = (size, signature)
            if stored:
                objects.append({"oid": oid, "size": size})
            else:
                href = f"{self.endpoint}/fake-lfs/{oid}?sig={signature}"
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": {"href": href}}})
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _store_lfs_object(self, oid: str, signature: str, body: bytes) -> None:
        """``PUT`` on an upload href: keep the bytes when they are the announced object."""
        with self._lock:
            expected = self._lfs_expected.get(oid)
        if expected is None or not secrets.compare_digest(expected[1], signature):
            raise _WriteError(403, f"No upload of LFS object {oid} was announced with this signature.")
        if len(body) != expected[0] or hashlib.sha256(body).hexdigest() != oid:
            raise _WriteError(400, f"LFS object {oid}: the bytes received are not the announced object.")
        path = self._upload_dir / "lfs" / oid
        with self._lock:
            if self._upload_bytes + len(body) > MAX_UPLOAD_BYTES:
                raise _WriteError(413, f"The fake hub keeps at most {MAX_UPLOAD_BYTES} uploaded bytes.")
            self._upload_bytes += len(body)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        with self._lock:
            self._lfs_objects[oid] = path
            self._lfs_expected.pop(oid, None)

    def _commit(self, repo: UploadedRepo, body: bytes) -> dict[str, Any]:
        """``commit``: check every NDJSON line, then write the files into the repo's folder."""
        try:
            lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _WriteError(400, f"The commit body is not NDJSON: {error}") from None
        if not lines or lines[0].get("key") != "header":
            raise _WriteError(400, "A commit starts with a 'header' line.")
        summary = str(lines[0].get("value", {}).get("summary", ""))
        regular: dict[str, bytes] = {}
        large: dict[str, Path] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _repo_path(value.get("path"))
            if key == "file":
                content = base64.b64decode(value.get("content", ""), validate=True)
                if b"\0" in content[:_BINARY_SNIFF_BYTES] or len(content) > REGULAR_MAX_BYTES:
                    raise _WriteError(
                        400, f"Your push was rejected because it contains binary files ({path}): "
                        "binary files and files over 10 MiB go through large-file storage (LFS or Xet).")
                regular[path] = content
            elif key == "lfsFile":
                with self._lock:
                    stored = self._lfs_objects.get(str(value.get("oid")))
                if stored is None or value.get("algo") != "sha256" or stored.stat().st_size != value.get("size"):
                    raise _WriteError(400, f"LFS file {path}: object {value.get('oid')} was not uploaded (or its size differs).")
                large[path] = stored
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(path)
            else:
                raise _WriteError(400, f"Unknown commit line key {key!r}.")
        added = sum(len(c) for c in regular.values()) + sum(p.stat().st_size for p in large.values())
        with self._commit_lock:
            with self._lock:
                if self._upload_bytes + added > MAX_UPLOAD_BYTES:
                    raise _WriteError(413, f"The fake hub keeps at most {MAX_UPLOAD_BYTES} uploaded bytes.")
                self._upload_bytes += added
            for path in deleted:
                target = repo.folder / path
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
            for path, content in regular.items():
                (repo.folder / path).parent.mkdir(parents=True, exist_ok=True)
                (repo.folder / path).write_bytes(content)
            for path, stored in large.items():
                (repo.folder / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stored, repo.folder / path)
            modes = {**{p: "regular" for p in regular}, **{p: "lfs" for p in large}}
            digest = hashlib.sha1(f"{repo.commits[-1].oid if repo.commits else ''}\0{summary}".encode())
            for path in sorted(modes):
                digest.update(f"\0{path}\0{modes[path]}".encode())
            commit = HubCommit(digest.hexdigest(), summary, modes, tuple(deleted))
            with self._lock:
                for path in deleted:
                    for held in [p for p in repo.files if p == path or p.startswith(path.rstrip("/") + "/")]:
                        del repo.files[held]
                repo.files.update(modes)
                repo.commits.append(commit)
        url = f"{self.endpoint}/{_LFS_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        return {"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": None}


def _file_in_folder(folder: Path, filename: str | None) -> Path | None:
    """The regular file ``filename`` inside ``folder``, or None (also for paths escaping the folder)."""
    if not filename:
        return None
    candidate = (folder / filename).resolve()
    if folder not in candidate.parents or not candidate.is_file():
        return None
    return candidate


def _read_body(handler: _Handler) -> bytes:
    """The request body (Content-Length or chunked), at most MAX_BODY_BYTES; a larger one is refused with 413."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks, total = [], 0
        while True:
            size = int(handler.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline(1024).strip():  # trailer lines, then the blank line
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                handler.close_connection = True
                raise _WriteError(413, f"Request bodies are limited to {MAX_BODY_BYTES} bytes.")
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline(16)  # the CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    if length > MAX_BODY_BYTES:
        handler.close_connection = True
        raise _WriteError(413, f"Request bodies are limited to {MAX_BODY_BYTES} bytes.")
    return handler.rfile.read(length)


def _json_body(body: bytes) -> dict[str, Any]:
    """A JSON object body, or a 400."""
    try:
        payload = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _WriteError(400, f"The body is not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise _WriteError(400, "The body is not a JSON object.")
    return payload


def _repo_path(path: Any) -> str:
    """A file path inside a repo (relative, posix, no '..' or .git), or a 400."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise _WriteError(400, f"Invalid path in repo: {path!r}.")
    parts = path.split("/")
    if any(part in ("", ".", "..", ".git") for part in parts):
        raise _WriteError(400, f"Invalid path in repo: {path!r}.")
    return path


def _lfs_patterns(gitattributes: Path) -> list[str]:
    """The patterns a ``.gitattributes`` file sends through LFS (``filter=lfs``); none when it is absent."""
    if not gitattributes.is_file():
        return []
    patterns = []
    for line in gitattributes.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def _matches_any(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` matches a gitattributes pattern (no slash: the file name; with one: the path)."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p.lstrip("/")) for p in patterns)


def _front_matter_errors(payload: Mapping[str, Any]) -> list[str]:
    """What ``/api/validate-yaml`` reports about a README's front matter (empty when it is fine)."""
    content, repo_type = payload.get("content"), payload.get("repoType") or "model"
    if not isinstance(content, str):
        return ["'content' must be the README text."]
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
    if match is None:
        return ["A Space README starts with a YAML front matter block."] if repo_type == "space" else []
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        return [f"Invalid YAML in the front matter: {error}"]
    if not isinstance(meta, dict):
        return ["The front matter is not a mapping."]
    errors = []
    if repo_type == "space":
        if meta.get("sdk") not in ("gradio", "docker", "static"):
            errors.append(f"\"sdk\" must be one of gradio, docker, static (got {meta.get('sdk')!r}).")
        for key in ("sdk_version", "python_version", "app_file"):
            if key in meta and not isinstance(meta[key], str):
                errors.append(f"\"{key}\" must be a string (got {meta[key]!r}); quote it.")
    return errors

def _parse_route(raw_path: str) -> _Route | None:
    """Parse a percent-encoded request path into a route, or None for paths the fake hub does not serve."""
    match = _API_RE.match(raw_path)
    if match is not None:
        repo_id = unquote(match["repo"])
        revision = unquote(match["rev"]) if match["rev"] else "main"
        sub = unquote(match["sub"]).strip("/") if match["sub"] else None
        return _Route("tree" if match["op"] == "tree" else "info", repo_id, revision, sub or None)
    if raw_path.startswith("/api/"):
        return None
    match = _RESOLVE_RE.match(raw_path)
    if match is not None:
        return _Route("resolve", unquote(match["repo"]), unquote(match["rev"]), unquote(match["file"]))
    return None


def _info_json(repo_id: str, snapshot: _Snapshot) -> dict[str, Any]:
    """The model-info document of ``/api/models/{repo}/revision/{rev}``."""
    return {
        "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
        "id": repo_id,
        "modelId": repo_id,
        "sha": snapshot.commit,
        "private": False,
        "gated": False,
        "disabled": False,
        "tags": [],
        "siblings": [{"rfilename": rel, "size": served.size} for rel, served in snapshot.files.items()],
    }


def _tree_json(snapshot: _Snapshot, sub: str | None, recursive: bool) -> list[dict[str, Any]] | None:
    """Tree entries under ``sub`` (root when None); None when ``sub`` is not a folder of the repo."""
    prefix = f"{sub}/" if sub else ""
    folders: set[str] = set()
    files: list[_ServedFile] = []
    for rel, served in snapshot.files.items():
        if not rel.startswith(prefix):
            continue
        parts = rel[len(prefix) :].split("/")
        for depth in range(1, len(parts)):
            if recursive or depth == 1:
                folders.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            files.append(served)
    if sub and not files and not folders:
        return None
    entries: list[dict[str, Any]] = [
        {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0}
        for path in sorted(folders)
    ]
    entries += [{"type": "file", "path": f.path, "size": f.size, "oid": f.git_sha1} for f in files]
    return entries


def _send_json(handler: _Handler, method: str, payload: Any, status: int = 200) -> None:
    """Send a JSON answer (headers only for HEAD)."""
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if method != "HEAD":
        handler.wfile.write(body)


def _send_error(
    handler: _Handler,
    method: str,
    status: int,
    error_code: str | None,
    message: str,
    extra_headers: Mapping[str, str] | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> None:
    """Send a Hub-style error: ``X-Error-Code``/``X-Error-Message`` headers and a JSON body."""
    body = json.dumps({"error": message, **(extra_body or {})}).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    if error_code is not None:
        handler.send_header("X-Error-Code", error_code)
    handler.send_header("X-Error-Message", message)
    for name, value in (extra_headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    if method != "HEAD":
        handler.wfile.write(body)


# --------------------------------------------------------------------- running the client
@dataclass
class HubClientResult:
    """What a `run_hub_client` snippet reported.

    Attributes:
        values: the keyword arguments passed to ``emit(...)`` in the snippet (JSON round-tripped,
            non-JSON values turned into ``str``).
        error: None, or the exception that escaped the snippet as ``{"type", "module", "mro",
            "message", "traceback"}`` (``mro`` lists class names, most derived first).
        sleeps: seconds huggingface_hub asked to sleep in its retry loops (skipped when fast_retries).
        process: the finished subprocess (stdout, stderr, returncode).
    """

    values: dict[str, Any]
    error: dict[str, Any] | None
    sleeps: list[float]
    process: subprocess.CompletedProcess[str]

    @property
    def ok(self) -> bool:
        """Whether the snippet ran to its end without an exception."""
        return self.error is None

    @property
    def error_type(self) -> str | None:
        """Class name of the escaped exception, e.g. ``"GatedRepoError"``; None when ok."""
        return None if self.error is None else self.error["type"]

    def raised(self, class_name: str) -> bool:
        """Whether the escaped exception is an instance of a class named ``class_name`` (subclasses count)."""
        return self.error is not None and class_name in self.error["mro"]

    def describe(self) -> str:
        """A readable summary for assertion messages: error, values and the tail of stderr."""
        return (
            f"error={self.error and self.error.get('traceback')}\nvalues={self.values}\n"
            f"stderr tail:\n{self.process.stderr[-3000:]}"
        )


_CLIENT_RUNNER = """
import json, sys, time, traceback, types

_sleeps = []
if {fast_retries!r}:
    import huggingface_hub.file_download as _hf_file_download
    import huggingface_hub.utils._http as _hf_http

    class _NoSleepTime(types.ModuleType):
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            _sleeps.append(float(seconds))

    _hf_http.time = _hf_file_download.time = _NoSleepTime("time")

_values = {{}}


def emit(**values):
    _values.update(values)


_error = None
try:
    exec(compile(sys.argv[1], "<hub-client>", "exec"), {{"__name__": "__hub_client__", "emit": emit}})
except BaseException as error:
    _error = {{
        "type": type(error).__name__,
        "module": type(error).__module__,
        "mro": [cls.__name__ for cls in type(error).__mro__],
        "message": str(error)[:4000],
        "traceback": traceback.format_exc()[-6000:],
    }}
sys.stdout.flush()
print({marker!r} + json.dumps({{"values": _values, "error": _error, "sleeps": _sleeps}}, default=str), flush=True)
"""


def hub_client_env(
    *,
    endpoint: str | None,
    hf_home: str | os.PathLike[str],
    offline: bool = False,
    download_timeout: int = 1,
    etag_timeout: int = 1,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment `run_hub_client` gives its subprocess.

    Starts from os.environ without any HF_*/HUGGINGFACE_* variable, token, proxy or
    TRANSFORMERS_OFFLINE, then sets the Hub settings and puts the repo root on PYTHONPATH.

    Args:
        endpoint: HF_ENDPOINT; None points at UNREACHABLE_ENDPOINT so the real Hub is never contacted.
        hf_home: HF_HOME (the cache is ``hf_home/hub``).
        offline: set HF_HUB_OFFLINE=1.
        download_timeout: HF_HUB_DOWNLOAD_TIMEOUT in whole seconds (>= 1; the client parses an int).
        etag_timeout: HF_HUB_ETAG_TIMEOUT in whole seconds (>= 1).
        env: extra variables, applied last.

    Returns:
        The environment mapping.
    """
    for name, value in (("download_timeout", download_timeout), ("etag_timeout", etag_timeout)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be whole seconds >= 1 (the client parses an int), got {value!r}.")
    dropped_prefixes = ("HF_", "HUGGINGFACE_")
    dropped = {"TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}
    result = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(dropped_prefixes) and name.upper() not in dropped
    }
    python_path = [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    result.update(
        {
            "HF_ENDPOINT": endpoint or UNREACHABLE_ENDPOINT,
            "HF_HOME": str(Path(hf_home)),
            "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DOWNLOAD_TIMEOUT": str(download_timeout),
            "HF_HUB_ETAG_TIMEOUT": str(etag_timeout),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONPATH": os.pathsep.join(python_path),
        }
    )
    result.update(env or {})
    return result


def run_hub_client(
    code: str,
    *,
    endpoint: str | None,
    hf_home: str | os.PathLike[str],
    offline: bool = False,
    fast_retries: bool = True,
    download_timeout: int = 1,
    etag_timeout: int = 1,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> HubClientResult:
    """Run a Python snippet that uses huggingface_hub in a fresh interpreter configured for a fake hub.

    The snippet runs with a global ``emit(**values)`` that records JSON-able results. An exception
    escaping the snippet is caught and reported in `HubClientResult.error`, so a test can assert
    both successes and the exact error class.

    Args:
        code: Python source; it imports what it needs (e.g. ``from huggingface_hub import hf_hub_download``).
        endpoint: HF_ENDPOINT (e.g. `HubServer.endpoint`); None points at an address nothing listens on.
        hf_home: HF_HOME; reuse it across calls to keep the cache.
        offline: set HF_HUB_OFFLINE=1.
        fast_retries: replace the ``time.sleep`` that huggingface_hub's retry loops
            (``utils/_http.py`` back-off, ~23 s on 500/refused; ``file_download.http_get``
            1 s per resume) use with a no-op that records the requested seconds.
        download_timeout: HF_HUB_DOWNLOAD_TIMEOUT, whole seconds.
        etag_timeout: HF_HUB_ETAG_TIMEOUT, whole seconds.
        timeout: hard wall-clock limit; ``subprocess.TimeoutExpired`` is raised past it (the child is killed).
        env: extra environment variables.

    Returns:
        The snippet's report.

    Raises:
        RuntimeError: the interpreter died before reporting (e.g. killed, or a crash at start-up).
    """
    runner = _CLIENT_RUNNER.format(fast_retries=fast_retries, marker=_RESULT_MARKER)
    process = subprocess.run(
        [sys.executable, "-c", runner, code],
        env=hub_client_env(
            endpoint=endpoint,
            hf_home=hf_home,
            offline=offline,
            download_timeout=download_timeout,
            etag_timeout=etag_timeout,
            env=env,
        ),
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    reports = [line for line in process.stdout.splitlines() if line.startswith(_RESULT_MARKER)]
    if not reports:
        raise RuntimeError(
            f"The hub client subprocess exited with code {process.returncode} without a report.\n"
            f"stdout:\n{process.stdout[-3000:]}\nstderr:\n{process.stderr[-3000:]}"
        )
    report = json.loads(reports[-1][len(_RESULT_MARKER) :])
    return HubClientResult(values=report["values"], error=report["error"], sleeps=report["sleeps"], process=process)


@contextlib.contextmanager
def patched_hub_client(
    *,
    endpoint: str | None,
    hf_home: str | os.PathLike[str],
    offline: bool = False,
    fast_retries: bool = True,
    download_timeout: int = 1,
    etag_timeout: int = 1,
) -> Iterator[list[float]]:
    """Point the already-imported huggingface_hub of this process at a fake hub, for the block's duration.

    Patches ``huggingface_hub.constants`` (endpoint, URL template, HF_HOME and cache, token path,
    offline flag, timeouts, Xet off, implicit token off), the endpoint of the module-level ``HfApi``,
    removes HF_TOKEN from the environment, and calls ``huggingface_hub.close_session()`` on entry
    and exit so no pooled connection crosses the boundary. Not thread-safe: one block at a time.

    Args:
        endpoint: the fake hub endpoint; None points at UNREACHABLE_ENDPOINT.
        hf_home: HF_HOME for the block (the cache is ``hf_home/hub``).
        offline: enable offline mode.
        fast_retries: make the client's retry sleeps no-ops (see `run_hub_client`).
        download_timeout: HF_HUB_DOWNLOAD_TIMEOUT in seconds.
        etag_timeout: HF_HUB_ETAG_TIMEOUT in seconds.

    Yields:
        The list that collects the seconds the client asked to sleep.
    """
    import huggingface_hub
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._http as hf_http

    endpoint = (endpoint or UNREACHABLE_ENDPOINT).rstrip("/")
    home = str(Path(hf_home))
    sleeps: list[float] = []
    real_time = file_download.time

    class _RecordingTime(types.ModuleType):
        """The time module with a sleep that only records."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real_time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            sleeps.append(float(seconds))

    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DOWNLOAD_TIMEOUT": download_timeout,
        "HF_HUB_ETAG_TIMEOUT": etag_timeout,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
        "HF_HUB_DISABLE_XET": True,
    }
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(mock.patch.object(constants, name, value))
        stack.enter_context(mock.patch.object(hf_api.api, "endpoint", endpoint))
        stack.enter_context(mock.patch.dict(os.environ))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            os.environ.pop(name, None)
        if fast_retries:
            recording_time = _RecordingTime("time")
            stack.enter_context(mock.patch.object(hf_http, "time", recording_time))
            stack.enter_context(mock.patch.object(file_download, "time", recording_time))
        stack.callback(huggingface_hub.close_session)
        huggingface_hub.close_session()
        yield sleeps
