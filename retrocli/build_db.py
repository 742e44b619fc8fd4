"""`retro build-db`: chunk → embed → index in one go. A rerun skips finished stages and resumes the
interrupted one (embed and index are resumable; chunking restarts, it is the cheap stage)."""

from __future__ import annotations

import os
from pathlib import Path

from retrocli.chunk import chunk_corpus
from retrocli.cluster import dask_client
from retrocli.db import MANIFEST, read_manifest, stage_status
from retrocli.device import resolve_device, resolve_devices
from retrocli.embed import embed_db
from retrocli.errors import RetroError
from retrocli.index import index_db
from retrocli.options import (
    ChunkOptions,
    EmbedOptions,
    IndexOptions,
)
from retrocli.progress import Progress


def build_db(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    chunk_options: ChunkOptions | None = None,
    embed_options: EmbedOptions | None = None,
    index_options: IndexOptions | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    dask=None,
    device: str = "auto",
    devices: str | None = None,
):
    """Chunk, embed and index, on `dask` when given (an address, 'local:N' or a distributed.Client; one
    cluster serves every stage)."""
    chunk_options = chunk_options or ChunkOptions()
    if devices is not None:
        resolve_devices(devices)  # devices that are not here are refused before chunking
    elif dask is None:
        resolve_device(device)
    out = Path(out)
    with dask_client(dask) as client:
        if (out / MANIFEST).exists() and not overwrite:
            manifest = read_manifest(out)
            chunk_state = manifest.get("stages", {}).get("chunk", {})
            same_inputs = chunk_state.get("inputs") == [str(Path(p).absolute()) for p in inputs]
            same_options = chunk_state.get("options") == chunk_options.__dict__
            if stage_status(manifest, "chunk") != "complete" or not (same_inputs and same_options):
                raise RetroError(
                    f"{out}: exists with other inputs or chunk options; pass --overwrite to rebuild it"
                )
        else:
            chunk_corpus(inputs, out, chunk_options, overwrite=overwrite, progress=progress, dask=client)
        embed_db(out, embed_options, progress=progress, dask=client, device=device, devices=devices)
        return index_db(out, index_options, progress=progress, dask=client)
