"""The model: `retro train`, `retro eval` and `retro generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from retrocli.cli.common import (
    console,
    err_console,
    handle_errors,
    print_json,
    progress_display,
    stream_text,
    user,
)
from retrocli.cli.options import (
    CacheDir,
    Dask,
    Device,
    ExcludeNearDuplicates,
    JsonOut,
    LocalThreads,
    ModelDir,
    SearchNprobe,
    SearchRerank,
    TestInputs,
    TextField,
    WorkDir,
    field_option,
    flag,
)
from retrocli.errors import RetroError
from retrocli.options import (
    DEFAULT_EVAL_BATCH,
    DEFAULT_GENERATE_LAMBDA,
    DEFAULT_INDEX_KIND,
    DEFAULT_KNN_BLOCK,
    DEFAULT_KNN_EF_CONSTRUCTION,
    DEFAULT_KNN_K,
    DEFAULT_KNN_M,
    DEFAULT_KNN_NPROBE,
    DEFAULT_KNN_PQ_BYTES,
    DEFAULT_KNN_SEED,
    DEFAULT_KNN_SHARD,
    DEFAULT_KNN_WINDOWS,
    DEFAULT_LAMBDA_BUCKETS,
    DEFAULT_LEAKAGE_K,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SAMPLING_SEED,
    DEFAULT_TEMPERATURE,
    DEFAULT_TEXT_FIELD,
    DEFAULT_TOP_K,
    DEFAULT_TRAIN_K,
    DatastoreOptions,
    KnnOptions,
    SamplingOptions,
    TrainOptions,
    check_knn_temperature,
    check_threads,
)
from retrocli.storage import fetch_db, local_inputs

KnnStore = Annotated[Path | None, field_option(KnnOptions, "datastore", "--knn-lm")]
KnnK = Annotated[int, field_option(KnnOptions, "k")]
KnnNprobe = Annotated[int | None, field_option(KnnOptions, "nprobe", "--knn-nprobe")]
KnnTemperature = Annotated[float | None, typer.Option(
    help="With --knn-lm: softmax temperature over -distance (default: tuned with --lambda auto, else the "
         "datastore's median nearest-key distance)")]
GenerateKnnTemperature = Annotated[float | None, typer.Option(
    "--knn-temperature",
    help="With --knn-lm: softmax temperature over -distance (default: the datastore's median nearest-key distance)")]


# training options shared by train and retrofit: help and defaults from TrainOptions
SeqLen = Annotated[int, field_option(TrainOptions, "seq_len")]
TrainBatchSize = Annotated[int, field_option(TrainOptions, "batch_size")]
Steps = Annotated[int, field_option(TrainOptions, "steps")]
LearningRate = Annotated[float, field_option(TrainOptions, "lr")]
Warmup = Annotated[int, field_option(TrainOptions, "warmup")]
WeightDecay = Annotated[float, field_option(TrainOptions, "weight_decay")]
GradClip = Annotated[float, field_option(TrainOptions, "grad_clip")]
TrainPrecision = Annotated[str, field_option(TrainOptions, "precision")]
TrainK = Annotated[int, typer.Option("--k", help="Neighbours per chunk fed to the encoder")]
CheckpointEvery = Annotated[int, field_option(TrainOptions, "checkpoint_every")]
TrainSeed = Annotated[int, field_option(TrainOptions, "seed")]
Resume = Annotated[bool, flag("--resume", "Continue OUT/checkpoint exactly where it stopped")]
RetrievalFocus = Annotated[float, field_option(TrainOptions, "retrieval_focus")]
Heldout = Annotated[Path | None, typer.Option(help="File of DB doc ids / ids / sources kept out of training")]
Nproc = Annotated[int, typer.Option(help="Data-parallel ranks to start on this machine (one per GPU, or CPU "
                                         "processes); --batch-size is the global batch")]
CompileModel = Annotated[bool, flag("--compile", "torch.compile the model (pays off on GPUs)")]
StaleRetrievalTraining = Annotated[bool, flag(
    "--stale-retrieval", "Chunk u reads the neighbours of chunk u-1, as `generate --stale-retrieval` delivers them")]
WindowExclusion = Annotated[str, field_option(TrainOptions, "window_exclusion")]


@handle_errors
def train_cmd(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (indexed): training corpus and retrieval DB")],
    neighbors: Annotated[Path, typer.Option(help="Batch neighbours of the DB itself (--exclude-same-doc)")],
    out: Annotated[Path, typer.Option(help="Model directory to write (checkpoints in OUT/checkpoint)")],
    heldout: Heldout = None,
    config: Annotated[str, field_option(TrainOptions, "config")] = TrainOptions.config,
    seq_len: SeqLen = TrainOptions.seq_len,
    batch_size: TrainBatchSize = TrainOptions.batch_size,
    steps: Steps = TrainOptions.steps,
    lr: LearningRate = TrainOptions.lr,
    warmup: Warmup = TrainOptions.warmup,
    weight_decay: WeightDecay = TrainOptions.weight_decay,
    grad_clip: GradClip = TrainOptions.grad_clip,
    precision: TrainPrecision = TrainOptions.precision,
    k: TrainK = DEFAULT_TRAIN_K,
    checkpoint_every: CheckpointEvery = TrainOptions.checkpoint_every,
    threads: LocalThreads = None,
    seed: TrainSeed = TrainOptions.seed,
    resume: Resume = False,
    retrieval_focus: RetrievalFocus = TrainOptions.retrieval_focus,
    copy_curriculum: Annotated[float, field_option(TrainOptions, "copy_curriculum")] = TrainOptions.copy_curriculum,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this saved model's weights (fine-tune; new schedule)")
    ] = None,
    device: Device = "auto",
    nproc: Nproc = 1,
    compile_model: CompileModel = False,
    stale_retrieval: StaleRetrievalTraining = False,
    window_exclusion: WindowExclusion = TrainOptions.window_exclusion,
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Train a RETRO decoder (AdamW, warmup + cosine, clipping, checkpoints, exact --resume).

    Several GPUs: --nproc N, or `torchrun --nproc-per-node N -m retrocli train …` (also across machines)."""
    opts = TrainOptions(
        config=config, seq_len=seq_len, batch_size=batch_size, steps=steps, lr=lr, warmup=warmup,
        weight_decay=weight_decay, grad_clip=grad_clip, precision=precision, threads=threads, seed=seed,
        checkpoint_every=checkpoint_every, retrieval_focus=retrieval_focus, copy_curriculum=copy_curriculum,
        compile=compile_model, stale_retrieval=stale_retrieval, window_exclusion=window_exclusion,
    )
    opts.check()  # before --nproc starts workers
    _run_training(dict(db=fetch_db(db, cache_dir), neighbors_path=neighbors, out=out, options=opts,
                       heldout=heldout, resume=resume, k=k, init_from=init_from, device=device),
                  nproc, threads, json_output)


@handle_errors
def retrofit_cmd(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (indexed), cut with the base's tokenizer")],
    neighbors: Annotated[Path, typer.Option(help="Batch neighbours of the DB itself (--exclude-same-doc)")],
    out: Annotated[Path, typer.Option(help="Model directory to write: the new weights only, and the base's name")],
    base: Annotated[str, field_option(TrainOptions, "base")] = "smollm2",
    cca_start: Annotated[int | None, field_option(TrainOptions, "cca_start")] = None,
    cca_every: Annotated[int, field_option(TrainOptions, "cca_every")] = TrainOptions.cca_every,
    encoder_width: Annotated[int | None, field_option(TrainOptions, "encoder_width")] = None,
    heldout: Heldout = None,
    seq_len: SeqLen = TrainOptions.seq_len,
    batch_size: TrainBatchSize = TrainOptions.batch_size,
    steps: Steps = TrainOptions.steps,
    lr: LearningRate = TrainOptions.lr,
    warmup: Warmup = TrainOptions.warmup,
    weight_decay: WeightDecay = TrainOptions.weight_decay,
    grad_clip: GradClip = TrainOptions.grad_clip,
    precision: TrainPrecision = TrainOptions.precision,
    k: TrainK = DEFAULT_TRAIN_K,
    checkpoint_every: CheckpointEvery = TrainOptions.checkpoint_every,
    threads: LocalThreads = None,
    seed: TrainSeed = TrainOptions.seed,
    resume: Resume = False,
    retrieval_focus: RetrievalFocus = TrainOptions.retrieval_focus,
    device: Device = "auto",
    nproc: Nproc = 1,
    compile_model: CompileModel = False,
    stale_retrieval: StaleRetrievalTraining = False,
    window_exclusion: WindowExclusion = TrainOptions.window_exclusion,
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """RETRO-fit a pretrained LM (paper §4.4): freeze it, add CCA branches and a neighbour encoder, train only those.

    Same data rules, checkpoints, exact --resume, --device, --nproc and --compile as `retro train`."""
    opts = TrainOptions(
        config="retrofit", seq_len=seq_len, batch_size=batch_size, steps=steps, lr=lr, warmup=warmup,
        weight_decay=weight_decay, grad_clip=grad_clip, precision=precision, threads=threads, seed=seed,
        checkpoint_every=checkpoint_every, retrieval_focus=retrieval_focus, compile=compile_model,
        stale_retrieval=stale_retrieval, window_exclusion=window_exclusion, base=base, cca_start=cca_start,
        cca_every=cca_every, encoder_width=encoder_width,
    )
    opts.check()
    _run_training(dict(db=fetch_db(db, cache_dir), neighbors_path=neighbors, out=out, options=opts,
                       heldout=heldout, resume=resume, k=k, device=device), nproc, threads, json_output)


def _run_training(kwargs: dict, nproc: int, threads: int | None, json_output: bool) -> None:
    from retrocli.distributed import launch, ranks_from_env
    from retrocli.train import train

    if nproc != 1:
        summary = launch(train, nproc, threads=threads, show_progress=not json_output, **kwargs)
    else:
        with progress_display(enabled=not json_output and ranks_from_env().is_main) as progress:
            summary = train(progress=progress, **kwargs)
        if not ranks_from_env().is_main:  # under torchrun, rank 0 reports for all
            return
    if json_output:
        print_json(summary)
        return
    mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
    final_loss = "unknown" if summary["final_loss"] is None else f"{summary['final_loss']:.3f}"
    ranks = f" on {summary['ranks']} ranks" if summary["ranks"] > 1 else ""
    trained = (f"the new layers ({summary['trainable_parameters'] / 1e6:.1f}M of {summary['parameters'] / 1e6:.1f}M "
               f"parameters, {summary['trainable_share']:.1%}) of a retrofit" if "trainable_parameters" in summary
               else f"{summary['parameters'] / 1e6:.1f}M-parameter model")
    console.print(
        f"[green]trained[/] {trained} for {summary['steps']} steps{ranks} "
        f"({summary['tokens_seen']:,} tokens, {summary['tokens_per_second']:.0f} tokens/s{mfu}, "
        f"{summary['precision']}); final loss {final_loss} → {user(summary['out'])}"
    )
    if summary["neighbor_fill"] < 0.99:
        err_console.print(
            f"[yellow]warning:[/] {1 - summary['neighbor_fill']:.1%} of neighbour slots were empty: the stored "
            "candidates were all from documents of the training window; rerun `retro neighbors` with more "
            "--candidates")


@handle_errors
def eval_cmd(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (indexed) to retrieve from")],
    test: TestInputs,
    model: ModelDir = None,
    leakage: Annotated[bool, typer.Option(help=f"Also compute r(C) (k={DEFAULT_LEAKAGE_K}) and bpb(alpha)")] = True,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass")] = DEFAULT_EVAL_BATCH,
    work_dir: WorkDir = None,
    text_field: TextField = DEFAULT_TEXT_FIELD,
    threads: LocalThreads = None,
    k: Annotated[int | None, typer.Option("--k", help="Neighbours per chunk fed to the model (default: the model's)")]
    = None,
    exclude_near_duplicates: ExcludeNearDuplicates = False,
    stale_retrieval: Annotated[bool, flag(
        "--stale-retrieval", "Also measure bpb with stale retrieval (chunk u reads the neighbours of chunk u-1)")
    ] = False,
    knn_lm: KnnStore = None,
    lam: Annotated[str, typer.Option("--lambda", help="With --knn-lm: the weight of p_kNN, or auto (tuned with T on "
                                     "half of the test documents, reported on the other half)")] = "auto",
    knn_k: KnnK = DEFAULT_KNN_K,
    knn_temperature: KnnTemperature = None,
    lambda_buckets: Annotated[int, field_option(KnnOptions, "buckets", "--lambda-buckets")] = DEFAULT_LAMBDA_BUCKETS,
    knn_nprobe: KnnNprobe = None,
    nprobe: SearchNprobe = None,
    rerank: SearchRerank = None,
    losses_out: Annotated[Path | None, typer.Option(
        help="Also write every scored token's bits with and without retrieval, and the neighbours fed, to this "
        ".npz")] = None,
    device: Device = "auto",
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Bits per byte on held-out documents, with retrieval from the DB and without, and bpb(alpha); with
    --knn-lm, the LM alone, RETRO, kNN-LM and RETRO + kNN-LM in one table."""
    from retrocli.eval import EXACT_WARNING, evaluate

    check_threads(threads)
    check_knn_temperature(knn_temperature)
    with progress_display(enabled=not json_output) as progress:
        knn = KnnOptions(knn_lm, lam, knn_k, knn_temperature, buckets=lambda_buckets, nprobe=knn_nprobe) \
            if knn_lm else None
        result = evaluate(fetch_db(db, cache_dir), local_inputs(test, cache_dir), model, leakage=leakage,
                          batch_size=batch_size, threads=threads, work_dir=work_dir,
                          text_field=text_field, progress=progress, k=k,
                          exclude_near_duplicates=exclude_near_duplicates, device=device,
                          stale_retrieval=stale_retrieval, knn=knn, losses_out=losses_out, nprobe=nprobe,
                          rerank=rerank)
    if result["exact_match_fraction"] > EXACT_WARNING:
        err_console.print(
            f"[yellow]warning:[/] {result['exact_match_fraction']:.0%} of test chunks retrieve themselves "
            "(distance 0): the test text is in the DB, so the gain includes copying it; see bpb(α) below, or "
            "pass --exclude-near-duplicates", soft_wrap=True)
    if json_output:
        print_json(result)
        return
    base = result.get("base")
    if base:
        architecture = (f"a retrofit of {user(base['name'])} ({base.get('architecture', '?')}, "
                        f"{base.get('parameters', 0) / 1e6:.0f}M parameters, frozen)")
    elif result["copy_head"]:
        architecture = "with the copy head (not the paper's architecture)"
    else:
        architecture = "the paper's architecture (no copy head)"
    console.print(f"model: {user(result['model'])}, {architecture}", soft_wrap=True)
    console.print(
        f"held-out: {result['test_documents']} documents, {result['test_chunks']:,} chunks, "
        f"{result['test_bytes']:,} bytes"
    )
    if result["excluded_near_duplicates"]:
        ex = result["excluded_near_duplicates"]
        console.print(f"near-duplicate DB documents excluded from retrieval: {ex['pairs']} pairs, "
                      f"{ex['neighbours_replaced']:,} neighbours replaced")
    console.print(
        f"bpb with retrieval (k={result['num_neighbors']}): [bold]{result['bpb_retrieval']:.4f}[/]   "
        f"{'base alone' if base else 'without'}: "
        f"{result['bpb_no_retrieval']:.4f}   gain {100 * result.get('retrieval_gain', 0):.1f}%"
    )
    if "bpb_stale_retrieval" in result:
        console.print(f"bpb with stale retrieval (chunk u reads chunk u-1's neighbours): "
                      f"[bold]{result['bpb_stale_retrieval']:.4f}[/]   cost vs fresh "
                      f"{100 * result['stale_retrieval_cost']:+.2f}%")
    if "curve" in result:
        table = Table(title="bpb(α): chunks with r(C) ≤ α", show_edge=False)
        for col in ("α", "chunks", "bpb retrieval", "bpb base alone" if base else "bpb none"):
            table.add_column(col, justify="right")
        for p in result["curve"]:
            fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
            table.add_row(f"{p['alpha']:g}", f"{p['chunks']:,}", fmt(p["bpb"]), fmt(p["bpb_no_retrieval"]))
        console.print(table)
    if "knn_lm" in result:
        print_knn_comparison(result["knn_lm"], retrofit=bool(base))


METHOD_NAMES = {"lm": "LM alone", "retro": "RETRO", "knn_lm": "kNN-LM", "retro_knn_lm": "RETRO+kNN-LM"}
RETROFIT_METHOD_NAMES = {"lm": "base alone", "retro": "retrofit", "knn_lm": "kNN-LM on the base",
                         "retro_knn_lm": "retrofit+kNN-LM"}


def print_knn_comparison(report: dict, retrofit: bool = False) -> None:
    names = RETROFIT_METHOD_NAMES if retrofit else METHOD_NAMES
    where = (f"{report['reported_documents']} test documents ({report['reported_chunks']:,} chunks); λ, T tuned "
             f"on {report['tuned_on_documents']} others" if report["lambda"] == "auto"
             else f"every test document ({report['reported_chunks']:,} chunks)")
    table = Table(title=f"Retrieval methods on {where}", show_edge=False)
    for col in ("method", "bpb", f"α≤{report['alpha']:g}", "λ", "T", "disk", "build", "eval"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    for row in report["methods"]:
        base = row["method"].removesuffix("_bucketed")
        name = names[base] + (" λ(d)" if row["method"].endswith("_bucketed") else "")
        interp = row.get("interpolation", {})
        lam = "λ(d)" if "bucket_lambdas" in interp else (f"{interp['lam']:g}" if interp else "–")
        table.add_row(name, fmt(row["bpb"]), fmt(row.get("bpb_alpha")), lam,
                      f"{interp['temperature']:.3g}" if interp else "–", f"{row['disk_bytes'] / 1e9:.2f} GB",
                      f"{row['build_seconds']:,.0f} s", f"{row['eval_seconds']:,.0f} s")
    console.print(table)
    console.print(f"[dim]α≤{report['alpha']:g}: bpb of the chunks with r(C) ≤ α; λ(d): one λ per bucket of "
                  f"nearest-key distance; kNN-LM: {report['keys']:,} keys, k={report['k']}; the same "
                  "near-duplicate documents are excluded from both kinds of retrieval[/]", soft_wrap=True)


@handle_errors
def knn_datastore(
    db: Annotated[Path, typer.Argument(help="DB directory or URL whose tokens become the datastore")],
    out: Annotated[Path, typer.Option(help="Datastore directory to write (resumed when it holds a partial one)")],
    model: ModelDir = None,
    block_size: Annotated[int, field_option(DatastoreOptions, "block_size")] = DEFAULT_KNN_BLOCK,
    shard_size: Annotated[int, field_option(DatastoreOptions, "shard_size")] = DEFAULT_KNN_SHARD,
    hnsw_m: Annotated[int, field_option(DatastoreOptions, "M", "--M")] = DEFAULT_KNN_M,
    ef_construction: Annotated[int, field_option(DatastoreOptions, "ef_construction")] = DEFAULT_KNN_EF_CONSTRUCTION,
    seed: Annotated[int, field_option(DatastoreOptions, "seed")] = DEFAULT_KNN_SEED,
    windows: Annotated[int, field_option(DatastoreOptions, "windows_per_batch", "--windows")] = DEFAULT_KNN_WINDOWS,
    kind: Annotated[str, field_option(DatastoreOptions, "kind")] = DEFAULT_INDEX_KIND,
    pq_bytes: Annotated[int, field_option(DatastoreOptions, "pq_bytes")] = DEFAULT_KNN_PQ_BYTES,
    nprobe: Annotated[int, field_option(DatastoreOptions, "nprobe")] = DEFAULT_KNN_NPROBE,
    threads: LocalThreads = None,
    dask: Dask = None,
    device: Device = "auto",
    overwrite: Annotated[bool, flag("--overwrite", "Replace a datastore built for another model, DB or options")]
    = False,
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Build a kNN-LM datastore: for every DB token, the model's hidden state before it (key) and the token
    (value), fp16 keys in zarr and an HNSW index over them, or (--kind ivfpq) IVF-PQ codes alone."""
    from retrocli.cli.common import cluster
    from retrocli.datastore import Datastore
    from retrocli.knn_datastore import build_datastore
    options = DatastoreOptions(block_size=block_size, shard_size=shard_size, M=hnsw_m, ef_construction=ef_construction,
                               seed=seed, windows_per_batch=windows, threads=threads, kind=kind, pq_bytes=pq_bytes,
                               nprobe=nprobe)
    with cluster(dask) as client, progress_display(enabled=not json_output) as progress:
        path = build_datastore(fetch_db(db, cache_dir), model, out, options, progress=progress, dask=client,
                               device=device, overwrite=overwrite)
    store = Datastore(path)
    summary = {"datastore": str(path), "keys": store.num_keys, "dim": store.dim, "disk_bytes": store.disk_bytes(),
               "seconds": {s: store.manifest["stages"][s].get("seconds") for s in ("keys", "index")},
               "temperature_scale": store.temperature_scale}
    if json_output:
        print_json(summary)
        return
    console.print(f"datastore {user(str(path))}: {summary['keys']:,} keys of {summary['dim']} dims, "
                  f"{summary['disk_bytes'] / 1e6:,.0f} MB; keys {summary['seconds']['keys']:,.0f} s, "
                  f"index {summary['seconds']['index']:,.0f} s", soft_wrap=True)


@handle_errors
def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue")],
    db: Annotated[Path | None, typer.Option("--db", help="DB directory or URL (indexed) to retrieve from")] = None,
    retriever: Annotated[str | None, typer.Option(
        help="Retrieve from a `retro serve` server (http://host:port) instead of opening a DB here")] = None,
    stale_retrieval: Annotated[bool, flag(
        "--stale-retrieval", "Decode chunk u+1 with the neighbours of chunk u-1 while chunk u's are retrieved "
                             "in the background (decoding never waits for retrieval)")] = False,
    model: ModelDir = None,
    max_new_tokens: Annotated[int, field_option(SamplingOptions, "max_new_tokens")] = DEFAULT_MAX_NEW_TOKENS,
    temperature: Annotated[float, field_option(SamplingOptions, "temperature")] = DEFAULT_TEMPERATURE,
    top_k: Annotated[int | None, field_option(SamplingOptions, "top_k")] = DEFAULT_TOP_K,
    top_p: Annotated[float | None, field_option(SamplingOptions, "top_p")] = None,
    seed: Annotated[int, field_option(SamplingOptions, "seed")] = DEFAULT_SAMPLING_SEED,
    k: Annotated[int | None, typer.Option("--k", help="Neighbours per chunk (default: the model's)")] = None,
    no_retrieval: Annotated[bool, flag("--no-retrieval", "Disable retrieval (plain decoder)")] = False,
    show_neighbors: Annotated[bool, flag("--show-neighbors", "Print each retrieval as it happens")] = False,
    knn_lm: KnnStore = None,
    lam: Annotated[float, typer.Option("--lambda", help="With --knn-lm: the weight of p_kNN")]
    = DEFAULT_GENERATE_LAMBDA,
    knn_k: KnnK = DEFAULT_KNN_K,
    knn_temperature: GenerateKnnTemperature = None,
    knn_nprobe: KnnNprobe = None,
    nprobe: SearchNprobe = None,
    rerank: SearchRerank = None,
    device: Device = "auto",
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Continue a prompt with a RETRO model, retrieving from the DB each time a chunk completes; with
    --knn-lm, sampling from the model's distribution mixed with the kNN-LM's."""
    from retrocli.generate import generate as run_generate

    prompt_shown = False

    def show_prompt() -> None:
        """The prompt goes out with the first output, once every check has passed: an error comes alone."""
        nonlocal prompt_shown
        if not json_output and not prompt_shown:
            stream_text(prompt)
            prompt_shown = True

    def on_text(text: str) -> None:
        if not json_output:
            show_prompt()
            stream_text(text)

    def on_retrieval(rec) -> None:
        if show_neighbors and not json_output:
            show_prompt()
            err_console.print(f"\n[dim]── chunk {rec.chunk_index} complete: retrieved[/]")
            for nb in rec.neighbors:
                err_console.print(
                    f"[cyan]  d={nb.distance:.3f} {user(nb.source)} · chunk {nb.id}[/]: {user(nb.text[:160])!s}…",
                    highlight=False,
                )

    if (db is None) == (retriever is None):
        raise RetroError("give exactly one of --db DB or --retriever http://host:port")
    result = run_generate(
        fetch_db(db, cache_dir) if db is not None else None,
        prompt,
        model_dir=model,
        sampling=SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed),
        k=k,
        retrieval=not no_retrieval,
        device=device,
        on_text=on_text,
        on_retrieval=on_retrieval,
        retriever=retriever,
        stale_retrieval=stale_retrieval,
        knn=KnnOptions(knn_lm, lam, knn_k, knn_temperature, nprobe=knn_nprobe) if knn_lm else None,
        nprobe=nprobe,
        rerank=rerank,
    )
    if json_output:
        print_json(
            {
                "prompt": result.prompt,
                "text": result.text,
                "retrievals": [
                    {"chunk": r.chunk_index, "chunk_text": r.chunk_text, "neighbors": [n.__dict__ for n in r.neighbors]}
                    for r in result.retrievals
                ],
                "copy": result.copy.__dict__ if result.copy else None,
                "stale_retrieval": stale_retrieval,
                "seconds": round(result.seconds, 4),
                "retrieval_wait_seconds": round(result.retrieval_wait_seconds, 4),
            }
        )
        return
    show_prompt()
    stream_text("\n")
    if show_neighbors and result.copy and result.copy.tokens >= 4:
        err_console.print(
            f"[dim]── the continuation shares a {result.copy.tokens}-token run with retrieved chunk "
            f"{result.copy.neighbor_id} ({user(result.copy.source)}):[/] [bold]{user(result.copy.text)!s}[/]",
            highlight=False,
        )
