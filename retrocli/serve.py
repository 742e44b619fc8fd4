"""`retro serve`: a DB's retrieval as an HTTP service that many clients share.

The DB is opened read-only and followed: every request stats its manifest (one os.stat) and, when another
version has been committed (`retro add`, `remove`, a rebuild), opens it before answering. A request is
answered from one opened version whole, and every JSON answer names it: "db_id", "version" and
"content_id" (retrocli.db.content_id). A DB that is gone, unreadable or found damaged gets 503 with one
line (no server path) until a new version is committed there. Requests that arrive within a short batching
window are answered by one embed + search call, so under load each BERT forward and each index search
serves many queries and throughput grows with the number of clients. One call runs at a time, in a worker
thread; requests that arrive while it runs form the next batch.

    GET  /health     {"status": "ok", db_id, version, content_id}, or 503 {"status": "unavailable", "error"}
    GET  /info       the DB: id, version, content id, chunks, chunk size, tokenizer, embedder, pad id, limits
    GET  /documents/N  document N whole: {"doc", "source", "text", "chunks": [{"id", "text"}]} (404 when it
                     does not exist or was removed)
    POST /neighbors  {"texts": [...]} or {"token_ids": [[...], ...]}, "k": 2,
                     optional "exclude_docs": [doc ids] (for every query) or
                     "exclude_docs_per_query": [[doc ids], ...], "exclude_same_doc": true
                     → {"results": [{"chunks": [{"chunk", "text", "neighbors": [{"id", "distance", "doc",
                        "source", "text", "continuation_id", "continuation", "tokens",
                        "continuation_tokens"}]}]}], "db_id", "version", "content_id"}

The page at / and the routes it reads beyond retrieval (POST /generate, POST /leakage) are added by
retrocli.web, which builds on this app.

Each text (or token list) is cut into chunks of the DB's chunk size, as `retro neighbors` does. A request
names no path: it can only read the DB's chunks and never changes anything. Bad requests (invalid UTF-8,
lone surrogates, NaN, duplicate keys, nesting beyond JSON's depth limit, wrong fields) get a 4xx with
{"error": one line}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from retrocli.db import MANIFEST, RetroDB, open_db
from retrocli.errors import RetroError
from retrocli.index import SearchWidth
from retrocli.neighbors import QueryChunk, split_query
from retrocli.options import DEFAULT_BATCH_WINDOW_MS, DEFAULT_EF_SEARCH, DEFAULT_MAX_BATCH, DEFAULT_QUERY_K
from retrocli.retriever import MAX_K, MAX_QUERY_CHUNKS, LocalRetriever

MAX_BODY_BYTES = 4 << 20
REQUEST_FIELDS = {"texts", "token_ids", "k", "exclude_docs", "exclude_docs_per_query", "exclude_same_doc"}


class BadRequest(Exception):
    """A request the server refuses with 400 and this one-line message."""


@dataclass
class Query:
    """One request, parsed: its chunks, how many neighbours, which documents each chunk may not use."""

    per_input: list[list[QueryChunk]]
    k: int
    exclude: list[set[int]] | None  # per chunk, flattened in input order
    exclude_same_doc: bool = False
    served: Served | None = None  # the DB version it was checked against and is answered from
    future: asyncio.Future | None = None

    @property
    def chunks(self) -> list[QueryChunk]:
        return [chunk for chunks in self.per_input for chunk in chunks]


def _int_list(value, name: str, low: int, high: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadRequest(f"'{name}' must be a list of integers")
    bad = [v for v in value if not low <= v < high]
    if bad:
        raise BadRequest(f"'{name}': {bad[0]} is out of range [{low}, {high})")
    return value


def _unique_fields(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise BadRequest("the body repeats a field name")
    return dict(pairs)


def _not_a_number(name: str):
    raise BadRequest(f"the body is not JSON ({name} is not a JSON number)")


def _holds_lone_surrogate(data) -> bool:
    """Whether any string (key or value) holds a lone surrogate such as "\\ud800", which is no text:
    the tokenizer and the JSON encoder both refuse it. Walked without recursion: nesting is the input's."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def strict_json(body: bytes):
    """The body parsed as strict JSON (UTF-8, no NaN/Infinity, no repeated field, text without lone
    surrogates), or BadRequest."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_not_a_number, object_pairs_hook=_unique_fields)
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text") from None
    except RecursionError:
        raise BadRequest("the body nests arrays or objects too deeply") from None
    except ValueError as err:
        raise BadRequest(f"the body is not JSON ({err})") from None
    if _holds_lone_surrogate(data):
        raise BadRequest("the body holds a lone surrogate (a \\uD800-\\uDFFF escape that is not part of a pair)")
    return data


def json_object(body: bytes, fields: set[str]) -> dict:
    """The body as a JSON object holding only `fields`, or BadRequest."""
    data = strict_json(body)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}' (expected some of {', '.join(sorted(fields))})")
    return data


def parse_request(body: bytes, db: RetroDB) -> Query:
    """The request body as a Query, or BadRequest naming the field at fault."""
    data = json_object(body, REQUEST_FIELDS)
    if ("texts" in data) == ("token_ids" in data):
        raise BadRequest("give exactly one of 'texts' or 'token_ids'")
    k = data.get("k", DEFAULT_QUERY_K)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(MAX_K, db.num_chunks):
        raise BadRequest(f"'k' must be an integer from 1 to {min(MAX_K, db.num_chunks)}")
    m = db.chunk_size
    if "texts" in data:
        texts = data["texts"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise BadRequest("'texts' must be a non-empty list of non-empty strings")
        per_input = [split_query(db, text) for text in texts]
    else:
        token_ids = data["token_ids"]
        if not isinstance(token_ids, list) or not token_ids:
            raise BadRequest("'token_ids' must be a non-empty list of token lists")
        vocab = db.tokenizer.vocab_size
        per_input = []
        for number, ids in enumerate(token_ids):
            ids = _int_list(ids, f"token_ids[{number}]", 0, vocab)
            if not ids:
                raise BadRequest(f"'token_ids[{number}]' is empty")
            per_input.append([QueryChunk(i // m, db.tokenizer.decode(ids[i : i + m]), ids[i : i + m])
                              for i in range(0, len(ids), m)])
    count = sum(len(chunks) for chunks in per_input)
    if count > MAX_QUERY_CHUNKS:
        raise BadRequest(f"{count} query chunks in one request; at most {MAX_QUERY_CHUNKS}")
    exclude = None
    if "exclude_docs" in data:
        docs = set(_int_list(data["exclude_docs"], "exclude_docs", 0, db.num_docs))
        exclude = [set(docs) for _ in range(count)]
    if "exclude_docs_per_query" in data:
        if exclude is not None:
            raise BadRequest("give at most one of 'exclude_docs' or 'exclude_docs_per_query'")
        rows = data["exclude_docs_per_query"]
        if not isinstance(rows, list) or len(rows) != count:
            raise BadRequest(f"'exclude_docs_per_query' must hold one list per query chunk ({count})")
        exclude = [set(_int_list(r, f"exclude_docs_per_query[{i}]", 0, db.num_docs)) for i, r in enumerate(rows)]
    same = data.get("exclude_same_doc", False)
    if not isinstance(same, bool):
        raise BadRequest("'exclude_same_doc' must be true or false")
    return Query(per_input, k, exclude, same)


@dataclass(frozen=True, eq=False)
class Served:
    """One committed version of the DB, opened: a request is checked against one and answered from it whole."""

    retriever: LocalRetriever
    stamp: tuple[int, int, int, int] | None  # the manifest's (inode, mtime, ctime, size) when it was opened
    info: dict

    @property
    def db(self) -> RetroDB:
        return self.retriever.db

    @property
    def identity(self) -> dict:
        return {key: self.info[key] for key in ("db_id", "version", "content_id")}


class Unavailable(Exception):
    """The DB cannot be served (gone, unreadable, damaged): 503 with this one-line message."""


def manifest_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes whenever a version is committed (the manifest is replaced by a rename): one stat.
    With the ctime, which no one can set back, a manifest rewritten in place with its old mtime and size
    (`cat other > manifest.json; touch -r old manifest.json`) is still seen as changed. None when the
    manifest cannot be stat'ed (the DB is gone)."""
    try:
        st = os.stat(path / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"]+/)*(?=[^\s/'\"])")


class ServedDB:
    """The DB at `path`, followed from version to version. `current()` stats the manifest per request and
    opens a newly committed version before answering from it; a DB that cannot be opened, or that a read
    finds damaged, is unavailable until its manifest changes again (a new commit, a rebuild, a restore)."""

    def __init__(self, path: str | os.PathLike, width: SearchWidth, device: str, limits: dict):
        self.path = Path(path).absolute()
        self.name = self.path.resolve().name or "db"
        self.width, self.device, self.limits = width, device, limits
        self.problem: str | None = None  # why it is unavailable, while the manifest keeps problem_stamp
        self.problem_stamp: tuple[int, int, int, int] | None = None
        self._lock = asyncio.Lock()
        self.served: Served | None = self._open(manifest_stamp(self.path))  # at startup a bad DB is one line

    def _open(self, stamp: tuple[int, int, int, int] | None) -> Served:
        db = open_db(self.path)
        retriever = LocalRetriever(db, device=self.device, **asdict(self.width))
        info = {
            "db": self.name, "db_id": db.manifest["db_id"], "version": db.version, "content_id": db.content_id,
            "chunks": db.num_chunks, "documents": db.num_docs, "chunk_size": db.chunk_size,
            "tokenizer_sha256": db.tokenizer_sha256, "vocab_size": db.tokenizer.vocab_size,
            "embedder": db.manifest["embedder"]["name"], "pad_id": retriever.pad, **self.limits,
            "max_k": min(MAX_K, db.num_chunks),
            # how the index is searched: its kind, and the width in force (ef; on ivfpq nprobe and rerank)
            "search": {"kind": retriever.index.kind, **self.width.settings(db)},
        }
        return Served(retriever, stamp, info)

    async def current(self) -> Served:
        """The version to answer from now, opened when it is new; Unavailable when there is none."""
        served = self.served
        if served is not None and manifest_stamp(self.path) == served.stamp:
            return served
        async with self._lock:  # one open at a time: requests that queued behind it reuse what it opened
            stamp = manifest_stamp(self.path)
            if self.served is not None and stamp == self.served.stamp:
                return self.served
            if self.served is None and stamp == self.problem_stamp:
                raise Unavailable(self.problem)
            try:
                served = await asyncio.to_thread(self._open, stamp)
            except Exception as err:  # noqa: BLE001 - whatever stops the open, the server answers 503
                raise Unavailable(self._fail(stamp, err)) from None
            self.served, self.problem, self.problem_stamp = served, None, None
            return served

    def damaged(self, served: Served, err: Exception) -> str:
        """A read from `served` failed: nothing more is answered from it until its manifest changes."""
        if self.served is served:
            return self._fail(served.stamp, err)
        return self._message(err)

    def _fail(self, stamp, err: Exception) -> str:
        self.served, self.problem_stamp, self.problem = None, stamp, self._message(err)
        return self.problem

    def _message(self, err: Exception) -> str:
        """One line without the server's paths: the DB's own path becomes its name, any other path its
        last part."""
        message = " ".join(str(err).split())
        for prefix in sorted({str(self.path), str(self.path.resolve())}, key=len, reverse=True):
            message = message.replace(prefix, self.name)
        return f"the served DB cannot be read: {_ABSOLUTE_PATH.sub('…/', message)}"


def answer_batch(served: Served, queries: list[Query]) -> list[dict]:
    """One embed + search call for every chunk of every query; each query's answer as JSON."""
    flat = [chunk for query in queries for chunk in query.chunks]
    k = max(query.k for query in queries)
    exclude = own = None
    if any(query.exclude is not None for query in queries):
        exclude = [row for query in queries for row in (query.exclude or [set()] * len(query.chunks))]
    if any(query.exclude_same_doc for query in queries):
        own = [chunk.tokens if query.exclude_same_doc else None for query in queries for chunk in query.chunks]
    found = served.retriever.retrieve_texts([chunk.text for chunk in flat], k, exclude, own)
    answers, at = [], 0
    for query in queries:
        results = []
        for chunks in query.per_input:
            out = []
            for chunk in chunks:
                got = found[at]
                neighbors = [{**nb.__dict__, "tokens": n, "continuation_tokens": f}
                             for nb, (n, f) in list(zip(got.neighbors, got.tokens))[: query.k]]
                out.append({"chunk": chunk.index, "text": chunk.text, "neighbors": neighbors})
                at += 1
            results.append({"chunks": out})
        answers.append({**served.identity, "results": results})
    return answers


class Batcher:
    """Collects queries for `window` seconds (or until `max_batch` chunks) and answers them in one call per
    DB version they were checked against (one, unless a new version was committed meanwhile)."""

    def __init__(self, window: float, max_batch: int):
        self.window, self.max_batch = window, max_batch
        self.queue: asyncio.Queue[Query] = asyncio.Queue()
        self.batches = 0
        self.batched_queries = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def submit(self, query: Query) -> dict:
        query.future = asyncio.get_running_loop().create_future()
        await self.queue.put(query)
        return await query.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0].chunks)
            deadline = loop.time() + self.window
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and self.queue.empty():
                    break
                try:
                    query = self.queue.get_nowait() if timeout <= 0 else \
                        await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(query)
                size += len(query.chunks)
            by_version: dict[int, list[Query]] = {}
            for query in batch:
                by_version.setdefault(id(query.served), []).append(query)
            for group in by_version.values():
                await self._answer(group)

    async def _answer(self, group: list[Query]) -> None:
        try:
            answers = await asyncio.to_thread(answer_batch, group[0].served, group)
        except Exception as err:  # noqa: BLE001 - every waiting client gets the error, the server lives on
            for query in group:
                if not query.future.done():
                    query.future.set_exception(err)
            return
        self.batches += 1
        self.batched_queries += len(group)
        for query, answer in zip(group, answers):
            if not query.future.done():
                query.future.set_result(answer)


# Every answer carries these: the page is self-contained (no CDN, no inline script), never framed by another
# site, and a browser never guesses a content type.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                    "cross-origin-opener-policy": "same-origin", "cross-origin-resource-policy": "same-origin"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class SecurityHeaders:
    """ASGI middleware: the headers above on every response, and PAGE_CSP unless a route set its own."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                extra = {**SECURITY_HEADERS, "content-security-policy": PAGE_CSP}
                headers += [(k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def json_reply(data: dict, served: Served | None = None, status: int = 200):
    """Every answer computed from the DB names the version it came from."""
    from starlette.responses import JSONResponse

    return JSONResponse({**data, **(served.identity if served else {})}, status_code=status)


def json_error(status: int, message: str, served: Served | None = None):
    return json_reply({"error": message}, served, status)


async def read_body(request, limit: int = MAX_BODY_BYTES, strict_type: bool = False):
    """The request's body as bytes, or the error response that refuses it (wrong type, too large, a client
    gone mid-body). strict_type: the media type must be application/json exactly, which a cross-site form
    or a CORS-simple request cannot send, so another site's page cannot start work here."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    media = request.headers.get("content-type", "application/json")
    if (media.split(";")[0].strip().lower() != "application/json") if strict_type else "json" not in media:
        return json_error(415, "send the request as application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return json_error(413, f"the body is larger than {limit} bytes")
    body = b""
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                return json_error(413, f"the body is larger than {limit} bytes")
    except ClientDisconnect:
        return Response(status_code=400)  # the client left mid-body: nobody reads this, nothing to log
    return body


def document_answer(served: Served, doc: int) -> dict:
    """A whole document of the served DB, chunk by chunk (a removed one is not served)."""
    db = served.db
    if doc in db.removed_docs:
        raise BadRequest(f"document {doc} was removed from the DB")
    chunks = db.doc_chunks(doc)
    return {"doc": doc, "source": db.source(doc), "text": db.document_text(doc),
            "chunks": [{"id": c, "text": db.chunk_text(c)} for c in chunks]}


def create_app(db_path: str | os.PathLike, ef: int = DEFAULT_EF_SEARCH, device: str = "cpu",
               nprobe: int | None = None, rerank: int | None = None,
               batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, max_batch: int = DEFAULT_MAX_BATCH,
               extra_routes: list | None = None, allowed_hosts: list[str] | None = None,
               route_help: str = "GET /health, GET /info, GET /documents/N, POST /neighbors"):
    """The Starlette app serving db_path. The DB, its index and its embedder are loaded here, and again
    whenever a new version of the DB is committed. extra_routes: more routes (the page, generation);
    their handlers find the followed DB as request.app.state.served_db. allowed_hosts: the Host headers
    answered (a server on a loopback address answers only loopback names, which keeps a DNS-rebinding page
    from reading it)."""
    try:
        import uvicorn  # noqa: F401 - checked here, before the DB is loaded
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise RetroError("retro serve needs starlette and uvicorn: pip install 'retrocli[serve]'") from None
    if not batch_window_ms >= 0:
        raise RetroError("--batch-window-ms: must be ≥ 0")
    if max_batch < 1:
        raise RetroError("--max-batch: must be at least 1")
    limits = {"batch_window_ms": batch_window_ms, "max_batch": max_batch, "max_query_chunks": MAX_QUERY_CHUNKS}
    served_db = ServedDB(db_path, SearchWidth(ef, nprobe, rerank), device, limits)
    batcher = Batcher(batch_window_ms / 1000, max_batch)
    reply, error = json_reply, json_error

    async def health(request: Request) -> JSONResponse:
        try:
            served = await served_db.current()
        except Unavailable as err:
            return JSONResponse({"status": "unavailable", "error": str(err)}, status_code=503)
        return reply({"status": "ok"}, served)

    async def get_info(request: Request) -> JSONResponse:
        try:
            served = await served_db.current()
        except Unavailable as err:
            return error(503, str(err))
        return reply({**served.info, **request.app.state.info_extra, "batches": batcher.batches,
                      "requests": batcher.batched_queries}, served)

    async def document(request: Request) -> JSONResponse:
        raw = request.path_params["doc"]
        try:
            served = await served_db.current()
        except Unavailable as err:
            return error(503, str(err))
        if not raw.isdigit() or not 0 <= int(raw) < served.db.num_docs:
            return error(404, f"no document {raw[:40]!r} in the DB (it has {served.db.num_docs} documents, "
                              f"numbered from 0)", served)
        try:
            return reply(await asyncio.to_thread(document_answer, served, int(raw)), served)
        except BadRequest as err:
            return error(404, str(err), served)
        except (RetroError, OSError) as err:
            return error(503, served_db.damaged(served, err))

    async def neighbors(request: Request) -> Response:
        body = await read_body(request)
        if not isinstance(body, bytes):
            return body
        try:
            served = await served_db.current()
        except Unavailable as err:
            return error(503, str(err))
        try:
            query = parse_request(body, served.db)
        except BadRequest as err:
            return error(400, str(err), served)
        query.served = served
        try:
            return reply(await batcher.submit(query))
        except (RetroError, OSError) as err:
            return error(503, served_db.damaged(served, err))
        except Exception as err:  # noqa: BLE001 - a bug: its traceback goes to the log, not to the client
            traceback.print_exception(err, file=sys.stderr)
            return error(500, f"internal error ({type(err).__name__}); the server's log has the details")

    async def not_found(request: Request, exc) -> JSONResponse:
        return error(404, f"no such route: {request.method} {request.url.path} (try {route_help})")

    async def not_allowed(request: Request, exc) -> JSONResponse:
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]), Route("/info", get_info, methods=["GET"]),
                Route("/documents/{doc}", document, methods=["GET"]),
                Route("/neighbors", neighbors, methods=["POST"]), *(extra_routes or [])],
        exception_handlers={404: not_found, 405: not_allowed},
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.batcher, app.state.served_db, app.state.info = batcher, served_db, served_db.served.info
    app.state.info_extra = {}  # what a layer above adds to GET /info (the loaded model, named test sets)
    return app


def run_app(app, host: str, port: int) -> None:
    """Serve until interrupted (uvicorn, one process); a port in use is one line."""
    import uvicorn

    try:  # uvicorn exits the process on a bind error: find it first, for one clear line
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise RetroError(f"cannot serve on {host}:{port} ({err.strerror or err})") from None
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    try:
        server.run()
    except SystemExit:
        raise RetroError(f"cannot serve on {host}:{port} (is the port in use?)") from None
