"""`retro serve`'s page, and the routes it reads beyond retrieval: streaming generation and leakage reports.

    GET  /                 the page: search, generate, leakage, documents. Self-contained: its script and style
                           come from /static, nothing from anywhere else, under a strict Content-Security-Policy
    GET  /static/NAME      the page's script and style
    POST /generate         {"prompt", optional "max_new_tokens", "temperature", "top_k", "top_p", "seed", "k",
                           "retrieval"}. With `Accept: text/event-stream`, server-sent events as the text is
                           written: `start` {prompt_tokens, k, chunk_size, model}, `text` {"text"} for each new
                           piece, `retrieval` {"chunk", "chunk_text", "neighbors"} for each completed chunk,
                           then `done` {"text", "copies", "copy", "tokens", "seconds"} or `error` {"error"}.
                           Otherwise one JSON answer: the done event with every retrieval.
    POST /leakage          {"test_set": NAME} (one the server was started with, --test-set NAME=FILE) or
                           {"upload": {"name": "test.jsonl", "content": "..."}}, optional "k", "alpha",
                           "examples" → {"report": (as `retro leakage-report --json`), "html": "/leakage/ID.html"}
    GET  /leakage/ID.html  that report as the self-contained HTML `retro leakage-report --html` writes

One generation and one leakage report run at a time, each in its own worker thread; others wait their turn.
A client that goes away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
import tempfile
import threading
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from retrocli.assets import asset_path
from retrocli.corpus import JSONL_SUFFIXES, TEXT_SUFFIXES
from retrocli.db import check_same_chunking
from retrocli.errors import RetroError
from retrocli.generate import Generation, Retrieval, copied_spans, generate
from retrocli.leakage import leakage_report
from retrocli.leakage_html import render_html
from retrocli.model.checkpoint import BUNDLED_MODELS, load_model, resolve_model
from retrocli.options import (
    DEFAULT_ALPHA,
    DEFAULT_EF_SEARCH,
    DEFAULT_EXAMPLES,
    DEFAULT_LEAKAGE_K,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SAMPLING_SEED,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    LeakageOptions,
    SamplingOptions,
)
from retrocli.serve import (
    LOOPBACK_HOSTS,
    BadRequest,
    Served,
    Unavailable,
    create_app,
    json_error,
    json_object,
    json_reply,
    read_body,
)

PAGE_FILES = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
MAX_PROMPT_CHARS = 20_000
MAX_SERVED_NEW_TOKENS = 1024  # a page's request cannot hold the model for longer than this
MAX_UPLOAD_BYTES = 16 << 20
KEPT_REPORTS = 16  # leakage reports kept for their HTML link, the oldest dropped first
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; sandbox"
TEST_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
GENERATE_FIELDS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "k", "retrieval"}
LEAKAGE_FIELDS = {"test_set", "upload", "k", "alpha", "examples"}
ROUTES = ("GET / (the page), GET /health, GET /info, GET /documents/N, POST /neighbors, POST /generate, "
          "POST /leakage")


class Cancelled(Exception):
    """The client of a generation went away."""


def page_file(name: str) -> Path:
    return asset_path("web") / name


def _number(data: dict, name: str, default, kind: type, low=None, high=None, allow_none: bool = False):
    """data[name] checked: of `kind` (an int is a float too, a bool is neither), within [low, high]."""
    value = data.get(name, default)
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if ok and kind is float:
        value = float(value)
        ok = value == value  # NaN is refused by strict_json already; kept for calls from Python
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" from {low} to {high}" if high is not None else f" ≥ {low}" if low is not None else ""
        kind_name = "an integer" if kind is int else "a number"
        raise BadRequest(f"'{name}' must be {kind_name}{bounds}{' or null' if allow_none else ''}")
    return value


def parse_generate(body: bytes, served: Served, num_neighbors: int) -> tuple[str, SamplingOptions, int, bool]:
    """A generation request as (prompt, sampling, k, retrieval), or BadRequest naming the field."""
    data = json_object(body, GENERATE_FIELDS)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"'prompt' is longer than {MAX_PROMPT_CHARS:,} characters")
    if not served.db.tokenizer.encode_batch([prompt])[0]:
        raise BadRequest("'prompt' encodes to no tokens")
    sampling = SamplingOptions(
        max_new_tokens=_number(data, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, int, 1, MAX_SERVED_NEW_TOKENS),
        temperature=_number(data, "temperature", DEFAULT_TEMPERATURE, float, 0),
        top_k=_number(data, "top_k", DEFAULT_TOP_K, int, 1, allow_none=True),
        top_p=_number(data, "top_p", None, float, 0, 1, allow_none=True),
        seed=_number(data, "seed", DEFAULT_SAMPLING_SEED, int, 0, 2**63 - 1),
    )
    k = _number(data, "k", num_neighbors, int, 1, served.info["max_k"])
    retrieval = data.get("retrieval", True)
    if not isinstance(retrieval, bool):
        raise BadRequest("'retrieval' must be true or false")
    return prompt, sampling, k, retrieval


def retrieval_json(rec: Retrieval) -> dict:
    return {"chunk": rec.chunk_index, "chunk_text": rec.chunk_text, "neighbors": [nb.__dict__ for nb in rec.neighbors]}


def in_neighbor(tokenizer, row, pad: int, chunk_size: int, start: int, end: int) -> dict:
    """Where tokens [start, end) of a neighbour's [N, F] row sit in its two texts, as character ranges:
    {"text": [a, b]} for N, {"continuation": [a, b]} for F, either or both."""
    tokens = [int(t) for t in row if t != pad]
    n_len = min(chunk_size, len(tokens))
    ranges = {}
    for name, low, high in (("text", 0, n_len), ("continuation", n_len, len(tokens))):
        a, b = max(start, low), min(end, high)
        if a < b:
            part = tokens[low:high]
            ranges[name] = [len(tokenizer.decode(part[: a - low])), len(tokenizer.decode(part[: b - low]))]
    return ranges


def done_json(result: Generation, served: Served) -> dict:
    """The finished generation: its text, the spans it copied from neighbours it had read (with where each
    sits in the neighbour's texts), timings."""
    db = served.db
    pad = served.retriever.pad
    copies = copied_spans(db.tokenizer, pad, result.token_ids, result.retrievals, result.prompt_tokens,
                          db.chunk_size)
    rows = {rec.chunk_index: rec.rows for rec in result.retrievals}
    marked = [{**asdict(span), "in_neighbor": in_neighbor(
        db.tokenizer, rows[span.chunk][span.rank], pad, db.chunk_size, span.neighbor_start,
        span.neighbor_start + span.end - span.start)} for span in copies]
    return {"text": result.text, "tokens": len(result.token_ids), "prompt_tokens": result.prompt_tokens,
            "copies": marked, "copy": asdict(result.copy) if result.copy else None,
            "seconds": round(result.seconds, 4), "retrieval_wait_seconds": round(result.retrieval_wait_seconds, 4),
            **served.identity}


class LoadedModel:
    """The model the page generates with, loaded once; `name` is what people see (never a server path)."""

    def __init__(self, model_dir: str | None, served: Served, device: str):
        self.path = resolve_model(model_dir, served.db)
        bundled = {str(asset_path(directory)): name for name, directory in BUNDLED_MODELS.items()}
        self.name = bundled.get(str(self.path), self.path.name)
        self.model, self.meta = load_model(self.path, served.db)
        self.model.to(device)
        self.num_neighbors = self.model.config.num_neighbors

    def check(self, served: Served) -> None:
        """A new DB version must still speak the model's tokens."""
        check_same_chunking(served.db, self.name, self.meta["tokenizer_sha256"], self.meta["chunk_size"],
                            subject="model ")

    @property
    def info(self) -> dict:
        return {"name": self.name, "num_neighbors": self.num_neighbors, "chunk_size": self.meta["chunk_size"],
                "parameters": sum(p.numel() for p in self.model.parameters())}


def named_test_sets(pairs: list[str]) -> dict[str, Path]:
    """--test-set NAME=FILE options as {name: path}, each checked now: the page can only name these."""
    sets: dict[str, Path] = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not TEST_SET_NAME.fullmatch(name) or not file:
            raise RetroError(f"--test-set {pair!r}: give NAME=FILE (NAME of letters, digits, '.', '_', '-')")
        if name in sets:
            raise RetroError(f"--test-set: the name {name!r} is given twice")
        path = Path(file)
        if not path.exists():
            raise RetroError(f"--test-set {name}: {path} does not exist")
        sets[name] = path
    return sets


def _upload_path(upload, directory: Path) -> Path:
    """An uploaded test set written into `directory` under a safe name with its format's suffix."""
    if not isinstance(upload, dict) or set(upload) != {"name", "content"} or not isinstance(upload["name"], str) \
            or not isinstance(upload["content"], str):
        raise BadRequest("'upload' must be {\"name\": file name, \"content\": its text}")
    name = Path(upload["name"].replace("\\", "/")).name
    suffixes = tuple(s for s in JSONL_SUFFIXES + TEXT_SUFFIXES if not s.endswith(".gz"))
    if not name.lower().endswith(suffixes):
        raise BadRequest(f"'upload.name': {name[:80]!r} is not a test set file ({', '.join(suffixes)})")
    if not upload["content"].strip():
        raise BadRequest("'upload.content' is empty")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    path = directory / safe
    path.write_text(upload["content"], encoding="utf-8")
    return path


def _scrub(data, prefix: str):
    """The report with a temporary directory's path taken out of every string (sources of an upload)."""
    if isinstance(data, str):
        return data.replace(prefix, "")
    if isinstance(data, list):
        return [_scrub(v, prefix) for v in data]
    if isinstance(data, dict):
        return {k: _scrub(v, prefix) for k, v in data.items()}
    return data


def create_web_app(db_path, model: str | None = None, use_model: bool = True, test_sets: dict | None = None,
                   host: str = "127.0.0.1", ef: int = DEFAULT_EF_SEARCH, device: str = "cpu",
                   nprobe: int | None = None, rerank: int | None = None, **serve_options):
    """The JSON API of retrocli.serve plus the page, generation with `model` (None: the bundled model that
    speaks the DB's tokens; when none does, the page searches but does not generate) and leakage reports."""
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    test_sets = test_sets or {}
    generation_pool = ThreadPoolExecutor(1, thread_name_prefix="retro-generate")
    leakage_pool = ThreadPoolExecutor(1, thread_name_prefix="retro-leakage")
    reports: OrderedDict[str, str] = OrderedDict()

    async def served_or_error(request: Request):
        try:
            return await request.app.state.served_db.current()
        except Unavailable as err:
            return json_error(503, str(err))

    async def page(request: Request) -> Response:
        return HTMLResponse(page_file("index.html").read_text(encoding="utf-8"),
                            headers={"cache-control": "no-cache"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in PAGE_FILES:
            return json_error(404, f"no such file: /static/{name[:80]}")
        return Response(page_file(name).read_bytes(), media_type=PAGE_FILES[name],
                        headers={"cache-control": "no-cache"})

    async def generate_route(request: Request) -> Response:
        body = await read_body(request, strict_type=True)
        if not isinstance(body, bytes):
            return body
        served = await served_or_error(request)
        if not isinstance(served, Served):
            return served
        loaded: LoadedModel | None = request.app.state.model
        if loaded is None:
            return json_error(501, f"this server has no model to generate with ({request.app.state.model_note})",
                              served)
        try:
            loaded.check(served)
            prompt, sampling, k, retrieval = parse_generate(body, served, loaded.num_neighbors)
        except (BadRequest, RetroError) as err:
            return json_error(400, str(err), served)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(event: str, data: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (event, data))

        def on_text(text: str) -> None:
            if cancelled.is_set():
                raise Cancelled
            emit("text", {"text": text})

        def work() -> None:
            if cancelled.is_set():
                return emit("cancelled", {})
            emit("start", {"prompt_tokens": len(served.db.tokenizer.encode_batch([prompt])[0]), "k": k,
                           "retrieval": retrieval, "chunk_size": served.db.chunk_size, "model": loaded.name,
                           **served.identity})
            try:
                result = generate(None, prompt, sampling=sampling, k=k, retrieval=retrieval, on_text=on_text,
                                  on_retrieval=lambda rec: emit("retrieval", retrieval_json(rec)),
                                  device=device, retriever=served.retriever,
                                  loaded=(loaded.model, loaded.meta))
                emit("done", done_json(result, served))
            except Cancelled:
                emit("cancelled", {})
            except (RetroError, OSError) as err:
                emit("error", {"error": " ".join(str(err).split())})
            except Exception as err:  # noqa: BLE001 - a bug: the traceback goes to the log, not to the client
                traceback.print_exception(err, file=sys.stderr)
                emit("error", {"error": f"internal error ({type(err).__name__}); the server's log has the details"})

        job = loop.run_in_executor(generation_pool, work)
        if "text/event-stream" not in request.headers.get("accept", ""):
            await job
            retrievals, answer = [], None
            while not events.empty():
                event, data = events.get_nowait()
                if event == "retrieval":
                    retrievals.append(data)
                elif event in ("done", "error"):
                    answer = (event, data)
            if answer is None or answer[0] == "error":
                return json_error(500 if answer is None else 400, answer[1]["error"] if answer else "no answer",
                                  served)
            return JSONResponse({**answer[1], "retrievals": retrievals})

        async def stream():
            try:
                while True:
                    event, data = await events.get()
                    if event == "cancelled":
                        return
                    yield f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
                    if event in ("done", "error"):
                        return
            finally:
                cancelled.set()  # the client left (or the stream ended): the worker stops at its next token

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    def run_leakage(served: Served, data: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="retro-leakage-") as tmp:
            if "test_set" in data:
                name = data["test_set"]
                if not isinstance(name, str) or name not in test_sets:
                    offered = ", ".join(sorted(test_sets)) or "none: start the server with --test-set NAME=FILE"
                    raise BadRequest(f"'test_set': no test set named {str(name)[:80]!r} (offered: {offered})")
                path, label = test_sets[name], name
            else:
                path = _upload_path(data["upload"], Path(tmp))
                label = path.name
            options = LeakageOptions(
                k=_number(data, "k", DEFAULT_LEAKAGE_K, int, 1, served.info["max_k"]),
                alpha=_number(data, "alpha", DEFAULT_ALPHA, float, 0, 1),
                examples=_number(data, "examples", DEFAULT_EXAMPLES, int, 0, 100), ef=ef, nprobe=nprobe,
                rerank=rerank)
            try:
                report = leakage_report(served.db, [path], options, work_dir=Path(tmp) / "work", device=device)
            except RetroError as err:  # about the upload: named as the client named it, not where it was put
                raise RetroError(str(err).replace(tmp + "/", "")) from None
            answer = _scrub(report.to_json(), tmp + "/")
        answer["db"], answer["test_inputs"] = served.info["db"], [label]
        return answer

    async def leakage_route(request: Request) -> Response:
        body = await read_body(request, limit=MAX_UPLOAD_BYTES, strict_type=True)
        if not isinstance(body, bytes):
            return body
        served = await served_or_error(request)
        if not isinstance(served, Served):
            return served
        try:
            data = json_object(body, LEAKAGE_FIELDS)
            if ("test_set" in data) == ("upload" in data):
                raise BadRequest("give exactly one of 'test_set' or 'upload'")
            report = await asyncio.get_running_loop().run_in_executor(leakage_pool, run_leakage, served, data)
        except (BadRequest, RetroError) as err:
            return json_error(400, " ".join(str(err).split()), served)
        except OSError as err:
            return json_error(503, request.app.state.served_db.damaged(served, err))
        report_id = secrets.token_hex(8)
        reports[report_id] = render_html(report)
        while len(reports) > KEPT_REPORTS:
            reports.popitem(last=False)
        return json_reply({"report": report, "html": f"/leakage/{report_id}.html"}, served)

    async def leakage_html(request: Request) -> Response:
        name = request.path_params["name"]
        html = reports.get(name.removesuffix(".html")) if name.endswith(".html") else None
        if html is None:
            return json_error(404, f"no leakage report {name[:40]!r} here (reports are kept while the server "
                                   f"runs, the last {KEPT_REPORTS})")
        return HTMLResponse(html, headers={"content-security-policy": REPORT_CSP})

    allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if host in LOOPBACK_HOSTS else None
    app = create_app(db_path, ef=ef, device=device, nprobe=nprobe, rerank=rerank, extra_routes=[
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/generate", generate_route, methods=["POST"]),
        Route("/leakage", leakage_route, methods=["POST"]),
        Route("/leakage/{name}", leakage_html, methods=["GET"]),
    ], allowed_hosts=allowed, route_help=ROUTES, **serve_options)
    served = app.state.served_db.served
    app.state.model, app.state.model_note = None, "started with --no-model"
    if use_model:
        try:
            app.state.model = LoadedModel(model, served, device)
            app.state.model_note = None
        except (RetroError, ImportError, OSError) as err:  # the default model may be absent from this install
            if model is not None:
                raise
            app.state.model_note = f"no bundled model speaks this DB's tokens ({' '.join(str(err).split())}); " \
                                   f"start it with --model M"
    app.state.info_extra = {
        "model": app.state.model.info if app.state.model else None, "model_note": app.state.model_note,
        "test_sets": sorted(test_sets), "max_new_tokens": MAX_SERVED_NEW_TOKENS,
        "defaults": {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": DEFAULT_TEMPERATURE,
                     "top_k": DEFAULT_TOP_K, "seed": DEFAULT_SAMPLING_SEED, "leakage_k": DEFAULT_LEAKAGE_K,
                     "alpha": DEFAULT_ALPHA, "examples": DEFAULT_EXAMPLES},
    }
    return app
