"""Retrieval: `retro neighbors`, by query text or in batch over a whole DB or corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from retrocli.cli.common import cluster, console, handle_errors, print_json, progress_display, user
from retrocli.cli.options import (
    BlockSize,
    CacheDir,
    Dask,
    Device,
    Ef,
    JsonOut,
    ModelDir,
    SearchNprobe,
    SearchRerank,
    Threads,
    field_option,
    flag,
)
from retrocli.errors import RetroError
from retrocli.options import (
    DEFAULT_BATCH_BLOCK,
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_EF_SEARCH,
    DEFAULT_MAX_BATCH,
    DEFAULT_QUERY_K,
    DEFAULT_SERVE_HOST,
    DEFAULT_SERVE_PORT,
    NeighborOptions,
    check_at_least,
    help_of,
)
from retrocli.storage import fetch_db, local_inputs


def _neighbors_json(query: str, chunks) -> dict:
    return {
        "query": query,
        "chunks": [{"chunk": c.index, "text": c.text, "neighbors": [n.__dict__ for n in c.neighbors]} for c in chunks],
    }


@handle_errors
def neighbors(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (indexed)")],
    query: Annotated[list[str] | None, typer.Option(help="Query text (repeatable)")] = None,
    query_file: Annotated[Path | None, typer.Option(help="File with one query per line")] = None,
    k: Annotated[int, field_option(NeighborOptions, "k")] = DEFAULT_QUERY_K,
    ef: Ef = DEFAULT_EF_SEARCH,
    nprobe: SearchNprobe = None,
    rerank: SearchRerank = None,
    exclude_same_doc: Annotated[bool, flag("--exclude-same-doc", help_of(NeighborOptions, "exclude_same_doc"))
                                ] = False,
    input: Annotated[list[Path] | None, typer.Option(
        "--input", help="Batch mode: a DB or corpus (path or URL) to query")] = None,
    out: Annotated[Path | None, typer.Option(help="Batch mode: output directory (zarr ids/distances)")] = None,
    embedder: Annotated[str | None, typer.Option(help="Must match the DB's embedder if given")] = None,
    candidates: Annotated[int | None, field_option(NeighborOptions, "candidates")] = None,
    block_size: BlockSize = DEFAULT_BATCH_BLOCK,
    threads: Threads = None,
    overwrite: Annotated[bool, flag("--overwrite", "Batch mode: replace --out")] = False,
    update: Annotated[bool, flag(
        "--update", "Batch mode: bring --out, computed on an earlier DB version, to this one (changed rows only)")
    ] = False,
    dask: Dask = None,
    replicas: Annotated[int, typer.Option(
        help="With --dask: workers that hold each index shard (more survive a lost worker without reloading)")] = 1,
    device: Device = "auto",
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Nearest DB chunks of a text with their continuations ([N, F]) and sources; batch mode with --input/--out.

    Batch mode writes the k neighbours of every chunk of a DB or corpus to zarr (what training reads).
    """
    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.db import open_db
    from retrocli.embed import check_embedder_matches
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.neighbors import query_neighbors

    db = fetch_db(db, cache_dir)
    opened = open_db(db)
    check_embedder_matches(opened, embedder)
    if dask and not (input or out):
        raise RetroError("--dask applies to batch mode (--input/--out); a query runs in this process")
    if input or out:
        if not (input and out):
            raise RetroError("batch mode needs both --input and --out")
        with cluster(dask) as client, progress_display(enabled=not json_output) as progress:
            options = NeighborOptions(k, ef, exclude_same_doc, candidates, block_size, nprobe=nprobe, rerank=rerank)
            path = batch_neighbors(db, local_inputs(input, cache_dir), out, options, threads=threads,
                                   overwrite=overwrite, progress=progress, dask=client, device=device,
                                   update=update, replicas=replicas)

        result = open_neighbors(path)
        summary = {
            "out": str(path),
            "queries": int(result.ids.shape[0]),
            "k": k,
            "candidates": int(result.ids.shape[1]),
            "missing": int((result.ids < 0).sum()),
            "seconds": result.manifest.get("seconds"),
            "db_version": result.manifest["settings"].get("db_version", 1),
            "update": result.manifest.get("update"),
        }
        if json_output:
            print_json(summary)
        elif update and summary["update"]:
            done = summary["update"]
            console.print(f"[green]updated[/] neighbours from DB version {done['from_version']} to "
                          f"{done['to_version']}: recomputed {done['rows_recomputed']:,} of {done['rows']:,} rows "
                          f"→ {user(path)}")
        else:
            console.print(f"[green]wrote[/] neighbours of {summary['queries']:,} chunks (k={k}) → {user(path)}")
        return
    texts = list(query or [])
    if query_file is not None:
        try:
            texts += [line.rstrip("\n") for line in query_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise RetroError(f"{query_file}: cannot read query file ({err})") from None
    results = query_neighbors(opened, texts, k=k, ef=ef, exclude_same_doc=exclude_same_doc, device=device,
                              nprobe=nprobe, rerank=rerank)
    if json_output:
        for text, chunks in zip(texts, results):
            print_json(_neighbors_json(text, chunks))
        return
    for number, chunks in enumerate(results, start=1):
        for chunk in chunks:
            table = Table(
                title=f"query {number}, chunk {chunk.index}: {user(chunk.text[:70])!s}…", show_lines=True, expand=True
            )
            table.add_column("#", width=3)
            table.add_column("dist", width=6)
            table.add_column("neighbour [N]", ratio=3)
            table.add_column("continuation [F]", ratio=3)
            table.add_column("source", ratio=2, overflow="fold")
            for rank, nb in enumerate(chunk.neighbors, start=1):
                table.add_row(
                    str(rank),
                    f"{nb.distance:.3f}",
                    user(nb.text),
                    user(nb.continuation) if nb.continuation is not None else "[dim](end of document)",
                    user(f"{nb.source} · chunk {nb.id}"),
                )
            console.print(table)


@handle_errors
def serve(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (indexed) to serve")],
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only; 0.0.0.0: every "
                                           "interface, with no authentication)")] = DEFAULT_SERVE_HOST,
    port: Annotated[int, typer.Option(help="TCP port")] = DEFAULT_SERVE_PORT,
    ef: Ef = DEFAULT_EF_SEARCH,
    nprobe: SearchNprobe = None,
    rerank: SearchRerank = None,
    batch_window_ms: Annotated[float, typer.Option(
        help="How long a request waits for others to share its embed + search call")] = DEFAULT_BATCH_WINDOW_MS,
    max_batch: Annotated[int, typer.Option(help="Query chunks per embed + search call at most")] = DEFAULT_MAX_BATCH,
    model: ModelDir = None,
    no_model: Annotated[bool, flag("--no-model", "Serve search and leakage only: load no model")] = False,
    test_set: Annotated[list[str] | None, typer.Option(
        "--test-set", help="NAME=FILE: a test set the page may run a leakage report on (repeatable)")] = None,
    threads: Threads = None,
    device: Device = "auto",
    cache_dir: CacheDir = None,
):
    """Serve the DB over HTTP: a page at / to search, generate and check leakage, and the JSON API
    (POST /neighbors, POST /generate, POST /leakage, GET /documents/N, GET /info, GET /health; docs/guide.md)."""
    import torch

    from retrocli.device import resolve_device
    from retrocli.serve import run_app
    from retrocli.web import create_web_app, named_test_sets

    if not 1 <= port <= 65535:
        raise RetroError(f"--port: {port} is not a TCP port (1-65535)")
    check_at_least("--threads", threads, allow_none=True)
    if threads:
        torch.set_num_threads(threads)
    if no_model and model is not None:
        raise RetroError("give at most one of --model and --no-model")
    sets = named_test_sets(test_set or [])
    path = fetch_db(db, cache_dir)
    app = create_web_app(path, model=str(model) if model is not None else None, use_model=not no_model,
                         test_sets=sets, host=host, ef=ef, nprobe=nprobe, rerank=rerank,
                         device=str(resolve_device(device)), batch_window_ms=batch_window_ms, max_batch=max_batch)
    info = app.state.info
    loaded = app.state.model
    console.print(f"serving {user(path)} ({info['chunks']:,} chunks) at [bold]http://{host}:{port}/[/] "
                  "— open it in a browser, or use the JSON API; Ctrl-C stops", soft_wrap=True)
    if loaded is not None:
        console.print(f"generating with {user(loaded.name)} ({loaded.num_neighbors} neighbours a chunk)")
    else:
        console.print(f"[yellow]note:[/] no generation: {user(app.state.model_note)}", soft_wrap=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]note:[/] bound to {host}: reachable from other machines, with no authentication")
    run_app(app, host, port)
