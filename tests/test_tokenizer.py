"""The LM tokenizer: the packaged byte-level BPE, `retro train-tokenizer`, and loading user tokenizers."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest
from conftest import SUBSET_TRAIN

from retrocli import RetroError, open_db
from retrocli.assets import asset_path
from retrocli.chunk import ChunkOptions, chunk_corpus
from retrocli.staging import staging_path
from retrocli.tokenizer import (
    BPE_8K_NAME,
    DEFAULT_TOKENIZER_NAME,
    END_OF_TEXT,
    NAMED_TOKENIZERS,
    SMOLLM2_NAME,
    default_tokenizer_path,
    load_tokenizer,
    train_tokenizer,
)

VOCAB_SIZES = {SMOLLM2_NAME: (49152, 49152), BPE_8K_NAME: (8000, 16384)}


@pytest.fixture(scope="module", params=sorted(NAMED_TOKENIZERS))
def tok(request):
    """Each packaged tokenizer, by name: smollm2 (the default, the bundled model's) and the 8k BPE."""
    return load_tokenizer(request.param)


def test_the_default_tokenizer_is_the_bundled_models():
    assert DEFAULT_TOKENIZER_NAME == SMOLLM2_NAME
    assert load_tokenizer().sha256 == load_tokenizer(SMOLLM2_NAME).sha256
    assert default_tokenizer_path() == asset_path(NAMED_TOKENIZERS[SMOLLM2_NAME])


TRICKY = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "\t\ttabs\tinside\t",
    "windows\r\nline\r\nendings\r\n",
    "old mac\rline",
    "NUL\x00inside\x00\x00",
    "control \x01\x07\x1b[31mred\x1b[0m \x7f",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "CJK 中文字符 日本語のテキスト 한국어",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 (not normalised)",
    "precomposed é vs decomposed e\u0301",
    "zero width\u200b\u200c\u200djoiner\ufeffBOM",
    "RTL: עברית العربية",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ",
    " " * 300 + "x" + "\n" * 200 + "\t" * 50,
    "replacement \ufffd char and private use \ue000 and noncharacter \uffff",
    "astral \U0010fffd end",
    f"special token text {END_OF_TEXT} inside a document",
    "<|pad|>",
]


def smollm2_can_spell(char: str) -> bool:
    """SmolLM2's vocabulary lacks 21 of the 256 byte symbols: six C0 controls and the lead bytes of code
    points U+40000..U+BFFFF (all unassigned), besides bytes UTF-8 never uses. SmolLM2 itself drops them."""
    return char not in "\x04\x06\x13\x14\x16\x1d" and not 0x40000 <= ord(char) <= 0xBFFFF


def round_trip(tok, texts):
    return [tok.decode(ids) for ids in tok.encode_batch(spelled(tok, texts))]


def spelled(tok, texts):
    """The texts as the tokenizer can spell them: as they are, but for smollm2's few lost characters."""
    if tok.name != SMOLLM2_NAME:
        return texts
    return ["".join(c for c in text if smollm2_can_spell(c)) for text in texts]


def test_smollm2_drops_exactly_the_characters_its_vocabulary_cannot_spell():
    tok = load_tokenizer(SMOLLM2_NAME)
    lost = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and not smollm2_can_spell(chr(c))]
    assert len(lost) == 6 + 0x80000
    for char in lost[:6] + lost[6::0x8000]:
        assert tok.decode(tok.encode_batch([f"a{char}b"])[0]) != f"a{char}b"
    kept = "".join(chr(c) for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF and smollm2_can_spell(chr(c)))
    assert tok.decode(tok.encode_batch([kept])[0]) == kept


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_packaged_tokenizer_round_trips_tricky_text(tok, text):
    assert round_trip(tok, [text]) == spelled(tok, [text])


def _random_text(rng: random.Random) -> str:
    ranges = [
        (0x00, 0x7F),  # ASCII incl. NUL and controls
        (0x80, 0x24F),  # Latin-1 and extended Latin
        (0x300, 0x36F),  # combining marks
        (0x370, 0x52F),  # Greek, Cyrillic
        (0x590, 0x6FF),  # Hebrew, Arabic
        (0x3040, 0x30FF),  # kana
        (0x4E00, 0x9FFF),  # CJK
        (0xAC00, 0xD7A3),  # Hangul
        (0xE000, 0xF8FF),  # private use
        (0xFE00, 0xFFFF),  # variation selectors, specials
        (0x1F300, 0x1FAFF),  # emoji
        (0x10000, 0x10FFFF),  # anything astral
    ]
    whitespace = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2028", "\u3000", "\x0b", "\x0c"]
    parts = []
    for _ in range(rng.randint(0, 60)):
        roll = rng.random()
        if roll < 0.25:
            parts.append(rng.choice(whitespace) * rng.randint(1, 8))
        elif roll < 0.45:
            parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz_.,;:()[]{}'\"") for _ in range(6)))
        else:
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:  # surrogates are not characters
                cp = 0xFFFD
            parts.append(chr(cp) * rng.randint(1, 3))
    return "".join(parts)


def test_packaged_tokenizer_round_trips_random_unicode(tok):
    rng = random.Random(20240611)
    texts = [_random_text(rng) for _ in range(600)]
    assert sum(len(t) for t in texts) > 20_000  # the generator really produces material
    decoded = round_trip(tok, texts)
    mismatches = [(t, d) for t, d in zip(spelled(tok, texts), decoded, strict=True) if t != d]
    assert not mismatches, mismatches[:3]


def test_packaged_tokenizer_round_trips_random_bytes_as_text(tok):
    # Arbitrary bytes read with errors="replace", as the corpus reader does by default.
    rng = random.Random(7)
    texts = [
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))).decode("utf-8", "replace")
        for _ in range(200)
    ]
    assert round_trip(tok, texts) == spelled(tok, texts)


def test_packaged_tokenizer_round_trips_real_corpus(tok, subset_texts):
    assert round_trip(tok, subset_texts) == subset_texts  # real text loses nothing


def test_packaged_tokenizer_vocab_and_identity(tok):
    low, high = VOCAB_SIZES[tok.name]
    assert low <= tok.vocab_size <= high
    raw = asset_path(NAMED_TOKENIZERS[tok.name]).read_bytes()
    assert tok.sha256 == hashlib.sha256(raw).hexdigest()
    assert tok.json == raw.decode("utf-8")
    data = json.loads(raw)
    assert data["model"]["type"] == "BPE"
    assert data["pre_tokenizer"]["type"] == "ByteLevel"
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["normalizer"] is None  # a normaliser would break the exact round trip


def test_packaged_tokenizer_compresses_english(tok, subset_texts):
    # trained on this kind of text: far fewer tokens than bytes, and every id inside the vocabulary
    ids = [i for seq in tok.encode_batch(subset_texts[:10]) for i in seq]
    n_bytes = sum(len(t.encode()) for t in subset_texts[:10])
    assert len(ids) < n_bytes / 3
    assert max(ids) < tok.vocab_size and min(ids) >= 0


# -- retro train-tokenizer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "nested" / "small.json"
    return train_tokenizer([SUBSET_TRAIN], 1000, out), out


def test_train_tokenizer_api_requested_size_and_round_trip(trained, subset_texts):
    tok, out = trained
    assert out.exists()
    assert tok.vocab_size == 1000
    assert tok.tokenizer.token_to_id(END_OF_TEXT) == 0
    assert round_trip(tok, subset_texts[:20] + TRICKY) == subset_texts[:20] + TRICKY
    reloaded = load_tokenizer(out)
    assert reloaded.sha256 == tok.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()


def test_train_tokenizer_cli_and_chunk_with_it(cli, tmp_path, make_corpus, subset_texts):
    out = tmp_path / "tok.json"
    result = cli("train-tokenizer", SUBSET_TRAIN, "--vocab-size", "700", "--out", out)
    assert result.exit_code == 0, result.output
    assert "vocab 700" in result.stdout
    tok = load_tokenizer(out)
    assert tok.vocab_size == 700
    # a smaller vocabulary means more tokens for the same text than the packaged 8k one
    assert sum(map(len, tok.encode_batch(subset_texts[:5]))) > sum(
        map(len, load_tokenizer().encode_batch(subset_texts[:5]))
    )

    db_path = tmp_path / "db"
    result = cli("chunk", SUBSET_TRAIN, "--out", db_path, "--tokenizer", out)
    assert result.exit_code == 0, result.output
    db = open_db(db_path)
    assert db.manifest["tokenizer"]["sha256"] == tok.sha256
    assert db.manifest["tokenizer"]["vocab_size"] == 700
    assert (db_path / "tokenizer.json").read_bytes() == out.read_bytes()
    assert [db.document_text(d) for d in range(db.num_docs)] == subset_texts


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--vocab-size", "100"], "--vocab-size"),
        (["--out", "{tmp}"], "is a directory"),
    ],
)
def test_train_tokenizer_bad_arguments(cli, tmp_path, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "t.json")]
    result = cli("train-tokenizer", SUBSET_TRAIN, *args)
    assert result.exit_code == 2, result.output
    assert result.exception is None
    assert len(result.error_lines) == 1 and fragment in result.error_lines[0]
    assert "Traceback" not in result.output


def test_train_tokenizer_bad_corpus_is_clean(cli, tmp_path, make_corpus):
    root = make_corpus({"c.jsonl": [{"text": "fine"}, "{not json"]})
    result = cli("train-tokenizer", root / "c.jsonl", "--out", tmp_path / "t.json")
    assert result.exit_code == 2, result.output
    assert result.exception is None
    assert "c.jsonl:2" in result.error_lines[0] and "invalid JSON" in result.error_lines[0]
    assert not (tmp_path / "t.json").exists()


# -- loading user tokenizers ---------------------------------------------------------------------------------


def test_load_from_directory_holding_tokenizer_json(tmp_path, tok):
    shutil.copy(asset_path(NAMED_TOKENIZERS[tok.name]), tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.sha256 == tok.sha256
    assert loaded.name == str(tmp_path)
    assert loaded.encode_batch(["same ids"]) == tok.encode_batch(["same ids"])


def test_chunk_with_tokenizer_directory(tmp_path, subset_texts):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(default_tokenizer_path(), tok_dir / "tokenizer.json")
    db = chunk_corpus([SUBSET_TRAIN], tmp_path / "db", ChunkOptions(tokenizer=str(tok_dir)))
    assert db.manifest["tokenizer"]["name"] == str(tok_dir)
    assert db.manifest["tokenizer"]["sha256"] == load_tokenizer().sha256
    assert db.document_text(3) == subset_texts[3]


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("missing", "tokenizer not found"),
        ("empty-dir", "no tokenizer.json"),
        ("malformed", "not a valid tokenizer.json"),
        ("json-not-tokenizer", "not a valid tokenizer.json"),
        ("not-utf8", "cannot read tokenizer"),
    ],
)
def test_bad_tokenizer_path_is_a_clean_error(tmp_path, cli, setup, fragment):
    target = tmp_path / "tok.json"
    if setup == "empty-dir":
        target = tmp_path / "tokdir"
        target.mkdir()
    elif setup == "malformed":
        target.write_text('{"version": "1.0", "model": ')
    elif setup == "json-not-tokenizer":
        target.write_text('{"hello": "world"}')
    elif setup == "not-utf8":
        target.write_bytes(b"\xff\xfe{}")
    with pytest.raises(RetroError) as info:
        load_tokenizer(target)
    assert fragment in str(info.value) and "tok" in str(info.value)
    assert "\n" not in str(info.value)

    result = cli("chunk", SUBSET_TRAIN, "--out", tmp_path / "db", "--tokenizer", target)
    assert result.exit_code == 2, result.output
    assert result.exception is None
    assert len(result.error_lines) == 1 and fragment in result.error_lines[0]
    assert not (tmp_path / "db").exists() and not staging_path(tmp_path / "db").exists()
