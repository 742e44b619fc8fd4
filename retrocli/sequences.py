"""Model inputs from a DB: token sequences aligned to the DB's chunks, and each chunk's neighbours as
[N, F] token rows. Shared by `retro train`, `retro eval` and `retro generate`.

Sequences are runs of L consecutive DB chunks (seq_len = L·m). Chunks keep their DB alignment, so the
neighbours precomputed for a DB chunk are exactly the neighbours of that chunk of the sequence; a short
last chunk of a document is padded to m with the pad token, which is never a prediction target.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from retrocli.db import RetroDB
from retrocli.errors import RetroError


def pad_id(db: RetroDB) -> int:
    return tokenizer_pad_id(db.tokenizer)


PAD_TOKENS = ("<|pad|>", "<pad>", "[PAD]")
# A tokenizer without a pad token (SmolLM2's) pads with its end-of-text token, the choice Hugging Face
# makes for such LMs; padded positions are masked (token_mask), so the id never reaches a loss.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "</s>", "[SEP]")


def tokenizer_pad_id(tokenizer) -> int:
    """The id a tokenizer (retrocli.tokenizer's wrapper) pads with: its pad token, else its end-of-text
    token; a tokenizer with neither is refused (a guess could be a real word that padding turns into)."""
    tok = tokenizer.tokenizer
    for name in PAD_TOKENS + END_OF_TEXT_TOKENS:
        found = tok.token_to_id(name)
        if found is not None:
            return int(found)
    raise RetroError(f"the tokenizer has no pad token ({', '.join(PAD_TOKENS)}) and no end-of-text token "
                     f"({', '.join(END_OF_TEXT_TOKENS)}); add one of them to its tokenizer.json")


def chunk_rows(db: RetroDB, start: int, stop: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [stop-start, m] with padding replaced by `pad`, and a mask of real tokens."""
    tokens, lengths = db.tokens_block(start, stop)
    tokens = tokens.astype(np.int64)
    real = np.arange(db.chunk_size)[None, :] < lengths[:, None]
    tokens[~real] = pad
    return tokens, real


def stale_neighbor_ids(ids: np.ndarray, chunk_doc: np.ndarray) -> np.ndarray:
    """Neighbour ids [N, k] as stale retrieval delivers them: chunk u gets those of chunk u−1 of its
    document, a document's first chunk none (−1). `chunk_doc` [N]: the document of each row's chunk."""
    out = np.full_like(ids, -1)
    same = chunk_doc[1:] == chunk_doc[:-1]
    out[1:][same] = ids[:-1][same]
    return out


def neighbor_rows(db: RetroDB, ids: np.ndarray, pad: int, tokens: np.ndarray | None = None,
                  lengths: np.ndarray | None = None) -> np.ndarray:
    """DB chunk ids [..., k] (−1 = missing) → [..., k, 2m] tokens of N followed by its continuation F,
    padded with `pad` (a missing neighbour is all pad, which the model masks)."""
    m = db.chunk_size
    flat = ids.reshape(-1)
    out = np.full((len(flat), 2 * m), pad, dtype=np.int64)
    doc = db.chunk_doc
    for row, nid in enumerate(flat):
        if nid < 0:
            continue
        if tokens is None:  # a few neighbours (generation): read just their rows, not the whole DB
            rows, lens = db.tokens_block(int(nid), min(int(nid) + 2, db.num_chunks))
            base = int(nid)
        else:
            rows, lens, base = tokens, lengths, 0
        n = int(lens[nid - base])
        out[row, :n] = rows[nid - base, :n]
        nxt = nid + 1
        if nxt < len(doc) and doc[nxt] == doc[nid]:
            f = int(lens[nxt - base])
            out[row, n : n + f] = rows[nxt - base, :f]
    return out.reshape(*ids.shape, 2 * m)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@lru_cache(maxsize=8)
def token_byte_lengths(tokenizer_json: str) -> np.ndarray | None:
    """UTF-8 bytes each token id encodes, for byte-level BPE (None for other tokenizers): what bpb counts."""
    spec = json.loads(tokenizer_json)
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    decoder = _bytes_to_unicode()
    vocab = spec["model"]["vocab"]
    special = {t["content"] for t in spec.get("added_tokens", [])}
    size = max(list(vocab.values()) + [t["id"] for t in spec.get("added_tokens", [])]) + 1
    lengths = np.zeros(size, dtype=np.int64)
    for token, idx in vocab.items():
        if token not in special:
            lengths[idx] = sum(1 for ch in token if ch in decoder)
    return lengths
