"""Test-set leakage: `retro leakage-report` and `retro dedupe`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from retrocli.cli.common import (
    cluster,
    console,
    err_console,
    handle_errors,
    print_json,
    progress_display,
    user,
    write_text,
)
from retrocli.cli.options import (
    Alpha,
    CacheDir,
    Dask,
    Device,
    Ef,
    ExcludeNearDuplicates,
    JaccardThreshold,
    JsonOut,
    KNeighbors,
    LocalThreads,
    NGram,
    Normalize,
    NumPerm,
    SearchNprobe,
    SearchRerank,
    TestInputs,
    TextField,
    Threads,
    WorkDir,
    field_option,
    flag,
)
from retrocli.options import (
    DEFAULT_ALPHA,
    DEFAULT_EF_SEARCH,
    DEFAULT_EXAMPLES,
    DEFAULT_JACCARD,
    DEFAULT_LEAKAGE_K,
    DEFAULT_NGRAM,
    DEFAULT_NORMALIZE,
    DEFAULT_NUM_PERM,
    DEFAULT_TEXT_FIELD,
    LeakageOptions,
)
from retrocli.storage import fetch_db, local_db, local_inputs


def _print_leakage(report) -> None:
    console.print(
        f"[bold]leakage of {report.num_test_docs:,} test documents ({report.num_test_chunks:,} chunks) "
        f"against {user(report.db)}[/], k={report.k}, normalize={report.normalize}"
    )
    console.print(
        f"leaking chunks (r > {report.alpha:g}): [bold]{report.leaking_chunks:,}[/] "
        f"({100 * report.leaking_fraction:.1f}%)   mean r(C): {report.mean_r:.3f}"
    )
    hist = Table(title="r(C) histogram", show_edge=False)
    hist.add_column("r(C)")
    hist.add_column("chunks", justify="right")
    hist.add_column("")
    edges, counts = report.histogram["edges"], report.histogram["counts"]
    top = max(counts) or 1
    for i in range(0, len(counts), 2):  # pairs of bins keep the table short
        c = counts[i] + counts[i + 1]
        hist.add_row(f"{edges[i]:.2f}–{edges[i + 2]:.2f}", f"{c:,}", "█" * max(0, round(30 * c / (2 * top))))
    console.print(hist)
    docs = Table(title="test documents by max r (top 10)", show_edge=False)
    for col in ("document", "chunks", "max r", "longest run", "mean r", "leaking"):
        docs.add_column(col, justify="left" if col == "document" else "right", overflow="fold")
    for d in report.documents[:10]:
        docs.add_row(user(d["source"]), str(d["chunks"]), f"{d['max_r']:.3f}", str(d["longest_run_tokens"]),
                     f"{d['mean_r']:.3f}", str(d["leaking_chunks"]))
    console.print(docs)
    for ex in report.examples:
        console.print(f"[bold]r={ex['r']:.3f}[/] ({ex['shared_tokens']} tokens) test {user(ex['test_source'])} ↔ "
                      f"DB {user(ex['db_source'])}")
        t = ex["test_text"]
        console.print(f"  {user(t[0][-60:])}[reverse]{user(t[1][:240])}[/]{user(t[2][:60])}", highlight=False)
    dup = report.near_duplicates
    if report.exclude_near_duplicates:
        console.print(f"near-duplicate DB documents excluded from retrieval: "
                      f"{report.near_duplicate_stats['neighbours_replaced']:,} neighbours replaced")
    if report.bpb:
        b = report.bpb
        if b.get("copy_head"):
            console.print("model has the copy head (not the paper's architecture)")
        console.print(
            f"bpb with retrieval {b['bpb_retrieval']:.4f}, without {b['bpb_no_retrieval']:.4f}; "
            + ", ".join(
                f"bpb(α={p['alpha']:g})={p['bpb']:.4f}"
                for p in b["curve"]
                if p["bpb"] is not None and p["alpha"] in (0.125, 0.5, 1.0)
            )
        )
    console.print(
        f"near-duplicate documents (≥ {report.jaccard_threshold:g} {report.ngram}-gram Jaccard): "
        f"[bold]{len(dup)}[/] pairs "
        f"({report.near_duplicate_stats['candidates']} LSH candidates verified exactly; documents shorter than "
        f"{report.ngram} tokens skipped: {report.near_duplicate_stats['short_documents_skipped']['test']} test, "
        f"{report.near_duplicate_stats['short_documents_skipped']['db']} DB)"
    )
    for p in dup[:20]:
        console.print(f"  {user(p['db_source'])} ≈ test {user(p['test_source'])}  J={p['jaccard']:.3f}")


@handle_errors
def leakage_report_cmd(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (indexed)")],
    test: TestInputs,
    k: KNeighbors = DEFAULT_LEAKAGE_K,
    alpha: Alpha = DEFAULT_ALPHA,
    examples: Annotated[int, field_option(LeakageOptions, "examples")] = DEFAULT_EXAMPLES,
    ngram: NGram = DEFAULT_NGRAM,
    num_perm: NumPerm = DEFAULT_NUM_PERM,
    jaccard_threshold: JaccardThreshold = DEFAULT_JACCARD,
    normalize: Normalize = DEFAULT_NORMALIZE,
    exclude_near_duplicates: ExcludeNearDuplicates = False,
    ef: Ef = DEFAULT_EF_SEARCH,
    nprobe: SearchNprobe = None,
    rerank: SearchRerank = None,
    json_output: JsonOut = False,
    json_path: Annotated[Path | None, typer.Option("--json-out", help="Write every figure as JSON here")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here")] = None,
    fail_above: Annotated[float | None, typer.Option(help="Exit 1 if the leaking fraction exceeds this")] = None,
    model: Annotated[Path | None, typer.Option(help="A RETRO model: also compute bpb(alpha) with retrieval")] = None,
    work_dir: WorkDir = None,
    text_field: TextField = DEFAULT_TEXT_FIELD,
    threads: Threads = None,
    dask: Dask = None,
    device: Device = "auto",
    cache_dir: CacheDir = None,
):
    """How much of a test set is already in the DB: chunk overlap r(C) (§2.6) and near-duplicate documents (§2.1)."""
    from retrocli.artifacts import check_outside
    from retrocli.leakage import leakage_report
    from retrocli.leakage_html import render_html

    db, test = fetch_db(db, cache_dir), local_inputs(test, cache_dir)
    for option, path in (("--json-out", json_path), ("--html", html)):
        if path is not None:  # refused before any work: a report file must never land inside the DB
            check_outside(path, db, option)
            if work_dir is not None:
                check_outside(path, work_dir, option, "the --work-dir")
    with cluster(dask) as client, progress_display(enabled=not json_output) as progress:
        report = leakage_report(
            db,
            test,
            LeakageOptions(k, alpha, ngram, num_perm, jaccard_threshold, normalize, ef, examples,
                           nprobe=nprobe, rerank=rerank),
            work_dir=work_dir,
            text_field=text_field,
            threads=threads,
            progress=progress,
            model_dir=model,
            dask=client,
            exclude_near_duplicates=exclude_near_duplicates,
            device=device,
        )
    data = report.to_json()
    say = err_console.print if json_output else console.print  # stdout carries only the JSON then
    if json_output:
        print_json(data)
    else:
        _print_leakage(report)
    if json_path:
        write_text(json_path, json.dumps(data, indent=2, ensure_ascii=False))
        say(f"JSON → {user(json_path)}")
    if html:
        write_text(html, render_html(data))
        say(f"HTML → {user(html)}")
    if fail_above is not None and report.leaking_fraction > fail_above:
        err_console.print(f"[bold red]leakage {report.leaking_fraction:.3f} exceeds --fail-above {fail_above}[/]")
        raise typer.Exit(1)


@handle_errors
def dedupe(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (indexed); never modified")],
    test: TestInputs,
    out: Annotated[Path, typer.Option(help="New DB (directory or URL) without the flagged documents")],
    drop_leaking_chunks: Annotated[
        bool, flag("--drop-leaking-chunks", "Also drop DB documents holding a chunk with r > alpha")
    ] = False,
    k: KNeighbors = DEFAULT_LEAKAGE_K,
    alpha: Alpha = DEFAULT_ALPHA,
    ngram: NGram = DEFAULT_NGRAM,
    num_perm: NumPerm = DEFAULT_NUM_PERM,
    jaccard_threshold: JaccardThreshold = DEFAULT_JACCARD,
    normalize: Normalize = DEFAULT_NORMALIZE,
    ef: Ef = DEFAULT_EF_SEARCH,
    nprobe: SearchNprobe = None,
    rerank: SearchRerank = None,
    work_dir: WorkDir = None,
    text_field: TextField = DEFAULT_TEXT_FIELD,
    threads: LocalThreads = None,
    overwrite: Annotated[bool, flag("--overwrite", "Replace an existing --out")] = False,
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Write a copy of the DB without the documents that near-duplicate (or, optionally, leak into) a test set."""
    from retrocli.dedupe import dedupe as run_dedupe

    with local_db(db, cache_dir) as source, local_db(out, cache_dir, write="retro dedupe") as target, \
            progress_display(enabled=not json_output) as progress:
        new_db, report, dropped = run_dedupe(
            source,
            local_inputs(test, cache_dir),
            target,
            drop_leaking_chunks=drop_leaking_chunks,
            overwrite=overwrite,
            options=LeakageOptions(k, alpha, ngram, num_perm, jaccard_threshold, normalize, ef, examples=0,
                                   nprobe=nprobe, rerank=rerank),
            work_dir=work_dir,
            text_field=text_field,
            threads=threads,
            progress=progress,
        )
    summary = {
        "out": str(new_db.path),
        "removed_documents": sorted(dropped),
        "documents": new_db.num_docs,
        "chunks": new_db.num_chunks,
        "near_duplicate_pairs": len(report.near_duplicates),
    }
    if json_output:
        print_json(summary)
        return
    console.print(
        f"[green]wrote[/] {user(new_db.path)}: removed {len(dropped)} documents, kept "
        f"{new_db.num_docs:,} documents / {new_db.num_chunks:,} chunks (embeddings copied, index rebuilt)"
    )
