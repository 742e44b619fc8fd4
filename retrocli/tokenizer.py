"""The language model's tokenizer: what chunks are stored in (BERT re-tokenizes their text later).

The default is a byte-level BPE trained on the example corpus and shipped in `retrocli/assets/`; it
round-trips any UTF-8 text exactly, which is what lets a DB give back its documents byte for byte.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from retrocli.assets import asset_path
from retrocli.corpus import CorpusOptions, iter_documents
from retrocli.errors import RetroError
from retrocli.options import DEFAULT_TEXT_FIELD

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
BPE_8K_NAME = "retrocli-bpe-8k"
SMOLLM2_NAME = "smollm2"
# A new DB speaks the bundled model's tokens: SmolLM2's 49k byte-level BPE (lossless for any UTF-8 text).
DEFAULT_TOKENIZER_NAME = SMOLLM2_NAME
# Tokenizers known by name: the files ship in retrocli/assets/. SmolLM2's is the one its GGUF carries,
# written out once as tokenizer.json, so that its sha256 never depends on a converter's version.
NAMED_TOKENIZERS = {BPE_8K_NAME: "tokenizer.json", SMOLLM2_NAME: "smollm2-tokenizer.json"}


def default_tokenizer_path() -> Path:
    return asset_path(NAMED_TOKENIZERS[DEFAULT_TOKENIZER_NAME])


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    name: str
    sha256: str
    json: str  # the exact serialisation, copied into every DB built with it

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __post_init__(self):
        # A literal "<|endoftext|>" inside a document is text, not a document boundary.
        self.tokenizer.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_tokenizer(path: str | os.PathLike | None = None) -> LoadedTokenizer:
    """Load a tokenizer by name (smollm2, retrocli-bpe-8k), a HF `tokenizer.json` file or a directory holding
    one; None means the default (smollm2)."""
    if path is None:
        path = DEFAULT_TOKENIZER_NAME
    if str(path) in NAMED_TOKENIZERS and not Path(path).exists():
        file, name = asset_path(NAMED_TOKENIZERS[str(path)]), str(path)
    else:
        file = Path(path)
        name = str(path)
        if file.is_dir():
            file = file / "tokenizer.json"
            if not file.exists():
                raise RetroError(f"{path}: directory has no tokenizer.json (pass a tokenizer.json file)")
        elif not file.exists():
            raise RetroError(f"{path}: tokenizer not found")
    try:
        text = file.read_text(encoding="utf-8")
        tokenizer = Tokenizer.from_str(text)
    except (OSError, UnicodeDecodeError) as err:
        raise RetroError(f"{file}: cannot read tokenizer ({err})") from None
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise RetroError(f"{file}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
    return LoadedTokenizer(tokenizer, name, text_sha256(text), text)


def tokenizer_from_json(text: str, name: str) -> LoadedTokenizer:
    return LoadedTokenizer(Tokenizer.from_str(text), name, text_sha256(text), text)


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out: str | os.PathLike,
    text_field: str = DEFAULT_TEXT_FIELD,
    min_frequency: int = 2,
) -> LoadedTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, lossless decode) and save tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 512:
        raise RetroError("--vocab-size: must be at least 512 (256 bytes plus merges)")
    out = Path(out)
    if out.is_dir():
        raise RetroError(f"{out}: is a directory; --out takes the tokenizer.json file to write")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = (doc.text for doc in iter_documents(inputs, CorpusOptions(text_field=text_field)))
    tokenizer.train_from_iterator(docs, trainer=trainer)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out))
    except Exception as err:  # OSError from mkdir, a bare Exception from the Rust side on save
        raise RetroError(f"{out}: cannot write tokenizer ({str(err).splitlines()[0]})") from None
    return load_tokenizer(out)
