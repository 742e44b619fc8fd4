"""The model directory: what `retro train` writes and eval, generate and --init-from read.

    OUT/config.json              RetroConfig (retro.py)
    OUT/model.safetensors        weights (no pickle anywhere)
    OUT/retrocli_model.json      meta: tokenizer sha256 and chunk size of the training DB, steps, ...
    OUT/tokenizer.json           the training DB's tokenizer, so the directory stands alone
    OUT/checkpoint/              while training: model + optimizer (safetensors) + state.json

A model reads token ids, so it only makes sense on a DB cut with the same tokenizer and chunk size:
load_model checks that before any weight is read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from retrocli.artifacts import read_manifest_file, write_json_atomic
from retrocli.assets import asset_path
from retrocli.db import RetroDB, check_same_chunking
from retrocli.errors import RetroError
from retrocli.model.retro import RetroModel
from retrocli.model.retrofit import RetrofitModel, is_retrofit
from retrocli.staging import staged

MODEL_META = "retrocli_model.json"
BUNDLED_MODEL = "bundled"  # the name of the model shipped in the package: SmolLM2-135M RETRO-fitted
RETRO_6M = "retro-6m"  # the 6M RETRO decoder trained from scratch on the 8k BPE, for DBs cut with it
BUNDLED_MODELS = {BUNDLED_MODEL: "model", RETRO_6M: "retro-6m"}  # name -> directory under retrocli/assets
MODEL_META_SCHEMA = {"tokenizer_sha256": (str, True), "chunk_size": (int, True)}  # checked before any load


def bundled_model_dir(name: str = BUNDLED_MODEL) -> Path:
    return asset_path(BUNDLED_MODELS[name])


def resolve_model(model_dir: str | os.PathLike | None, db=None) -> Path:
    """A model directory from the user's choice: a path, or a bundled model by name (bundled, retro-6m).
    None is the bundled model that speaks `db`'s tokens: the retrofitted SmolLM2, or the 6M decoder for a
    DB cut with the 8k BPE (so that DBs built before SmolLM2 became the default keep working)."""
    if model_dir is None:
        if db is not None:
            for name in BUNDLED_MODELS:
                meta = bundled_model_dir(name) / MODEL_META
                try:
                    if json.loads(meta.read_text(encoding="utf-8"))["tokenizer_sha256"] == db.tokenizer_sha256:
                        return bundled_model_dir(name)
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return bundled_model_dir()
    if str(model_dir) in BUNDLED_MODELS and not Path(model_dir).exists():
        return bundled_model_dir(str(model_dir))
    path = Path(model_dir)
    if not path.exists():
        raise RetroError(f"{path}: no model there (train one with `retro train`, or pass --model)")
    return path


def load_model(model_dir: str | os.PathLike | None, db: RetroDB, base: str | os.PathLike | None = None
               ) -> tuple[RetroModel, dict]:
    """Load a trained model (in eval mode) and its meta; refuse a DB whose tokenizer or chunk size differs
    from its training DB."""
    path = resolve_model(model_dir, db)
    meta_file = path / MODEL_META
    if not meta_file.exists():
        raise RetroError(f"{path}: not a retro model directory (no {MODEL_META})")
    meta = read_manifest_file(meta_file, "model metadata", schema=MODEL_META_SCHEMA)
    check_same_chunking(db, path, meta["tokenizer_sha256"], meta["chunk_size"], subject="model ")
    return load_saved_model(path, base=base).eval(), meta


def load_saved_model(path: Path, device="cpu", base: str | os.PathLike | None = None):
    """A RetroModel, or a RetrofitModel where the directory names a base (base.json); `base` overrides
    where a retrofit's base is found (refused unless it is the same weights)."""
    try:
        if is_retrofit(path):
            return RetrofitModel.from_pretrained(path, device=device, base=base)
        if base is not None:
            raise RetroError(f"--base {base}: {path} is not a retrofitted model (it has its own weights)")
        return RetroModel.from_pretrained(path, device=device)
    except (OSError, ValueError, KeyError) as err:
        raise RetroError(f"{path}: cannot load model ({err})") from None


def write_model_meta(out: Path, db: RetroDB, extra: dict) -> None:
    (out / "tokenizer.json").write_text(db.tokenizer.json, encoding="utf-8")
    write_json_atomic(
        out / MODEL_META,
        {
            "tokenizer_sha256": db.manifest["tokenizer"]["sha256"],
            "chunk_size": db.chunk_size,
            "trained_on": {"db": str(db.path.absolute()), "db_id": db.manifest["db_id"]},
            **extra,
        },
    )


def save_checkpoint(dir: Path, model: RetroModel, optimizer, state: dict) -> None:
    """Model + optimizer tensors as safetensors, the rest as JSON; written in a staging directory beside
    (retrocli.staging), then renamed in. A failure (a full disk) leaves the previous checkpoint, which
    --resume reads."""
    with staged(dir, "retro train (checkpoint)", remove_old=_remove_checkpoint) as tmp:
        model.save_pretrained(tmp)
        tensors, meta = {}, {}
        for param_id, pstate in optimizer.state_dict()["state"].items():
            for key, value in pstate.items():
                tensors[f"{param_id}.{key}"] = (
                    value.detach().clone().contiguous() if torch.is_tensor(value) else torch.tensor(value)
                )
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta["param_groups"] = optimizer.state_dict()["param_groups"]
        write_json_atomic(tmp / "optimizer.json", meta)
        write_json_atomic(tmp / "state.json", state)


def _remove_checkpoint(dir: Path) -> None:
    """The checkpoint being replaced: only a directory that holds one (or nothing)."""
    if dir.is_symlink() or not dir.is_dir() or (any(dir.iterdir()) and not (dir / "state.json").is_file()):
        raise RetroError(f"{dir}: is not a checkpoint; refusing to replace it")
    shutil.rmtree(dir)


def load_optimizer(dir: Path, optimizer) -> None:
    tensors = load_file(str(dir / "optimizer.safetensors"))
    meta = json.loads((dir / "optimizer.json").read_text())
    state: dict = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
