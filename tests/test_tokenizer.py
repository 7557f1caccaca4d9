"""The local byte-level BPE tokenizer: lossless on any text, no UNK, saves and reloads offline."""

import random

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from modeling_parallelflow.corpus import load_corpus
from modeling_parallelflow.tokenizer import SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    train, _ = load_corpus(max_bytes=200_000)
    return build_tokenizer(train, vocab_size=600, model_max_length=512)


def _random_text(rng: random.Random, length: int) -> str:
    # Any code point except surrogates (not encodable as UTF-8), weighted towards ASCII and low planes.
    chars = []
    for _ in range(length):
        top = rng.choice([0x80, 0x800, 0x10000, 0x110000])
        cp = rng.randrange(top)
        chars.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "\ufffd")
    return "".join(chars)


TEXTS = [
    "",
    " ",
    "def f(x):\n    return x ** 2  # square\n",
    "\t\r\n\x00\x01\x7f leading and trailing spaces   ",
    "".join(chr(i) for i in range(256)),
    "héllo wörld — ñ 中文 日本語 한국어 العربية 😀🚀 \U0001f9d1\u200d\U0001f4bb",
    "\ufeffBOM, combining e\u0301 vs \u00e9, NBSP\u00a0, zero width\u200b",
]


@pytest.mark.parametrize("text", TEXTS, ids=[f"text{i}" for i in range(len(TEXTS))])
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_round_trip_random_unicode(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        text = _random_text(rng, rng.randrange(1, 80))
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_every_byte_has_a_token_and_no_unk(tokenizer):
    assert tokenizer.unk_token is None
    assert len(tokenizer) <= 600
    for byte in range(256):
        text = bytes([byte]).decode("latin-1")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids and all(i >= len(SPECIAL_TOKENS) for i in ids)
    # the 256 byte symbols of the byte-level alphabet are all in the vocabulary
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(tokenizer.get_vocab())


def test_special_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == list(SPECIAL_TOKENS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    # encode adds nothing: documents are packed with an explicit eos by the training code
    assert tokenizer("x")["input_ids"] == tokenizer("x", add_special_tokens=False)["input_ids"]


def test_save_and_load_offline(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
    assert loaded.model_max_length == 512
    assert len(loaded) == len(tokenizer)


def test_deterministic():
    train, _ = load_corpus(max_bytes=100_000)
    a = build_tokenizer(train, vocab_size=400)
    b = build_tokenizer(train, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vocab_size": 100}, "vocab_size"),
        ({"min_frequency": 0}, "min_frequency"),
        ({"model_max_length": 0}, "model_max_length"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_tokenizer(["abc"], **kwargs)
