"""The offline GPT-4 (cl100k_base) tokenizer with DBRX's special tokens."""

from __future__ import annotations

import base64
import gzip
import hashlib
import pickle
import socket

import pytest

from platform.data import tokenizer as tokmod
from platform.data.errors import DataError
from platform.data.tokenizer import DBRX_VOCAB_SIZE, Tokenizer, get_tokenizer

# Reference ids, computed once with tiktoken.Encoding(**tiktoken_ext.openai_public.cl100k_base())
# built from the same ranks file (tiktoken's own pattern and special tokens).
SAMPLES = {
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n'
    "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n":
        [755, 16178, 1471, 25, 528, 8, 1492, 528, 512, 262, 4304, 5715, 279, 308, 7716, 80783, 1396, 14781,
         262, 471, 308, 422, 308, 366, 220, 17, 775, 16178, 1471, 482, 220, 16, 8, 489, 16178, 1471, 482,
         220, 17, 340],
    "Ship it 🚀🔥 — done ✅ 👩\u200d💻":
        [30724, 433, 11410, 248, 222, 9468, 242, 98, 2001, 2884, 26602, 227, 62904, 102, 378, 235, 93273, 119],
    "Привет, мир! こんにちは世界。مرحبا بالعالم. 你好，世界！ Γειά σου κόσμε":
        [54745, 28089, 8341, 11, 11562, 78746, 0, 220, 90115, 3574, 244, 98220, 1811, 10386, 11318, 30925,
         22071, 5821, 28946, 32482, 24102, 32482, 10386, 13, 220, 57668, 53901, 3922, 3574, 244, 98220, 6447,
         85316, 31243, 30862, 75234, 48823, 73986, 72738, 76295, 45028, 44223, 31243],
    "  x\t= {'key': [1, 22, 333, 4444]}\r\n<|endoftext|> caf\u00e9 na\u00efve":
        [220, 865, 197, 28, 5473, 798, 1232, 510, 16, 11, 220, 1313, 11, 220, 8765, 11, 220, 14870, 19, 60,
         1809, 27, 91, 8862, 728, 428, 91, 29, 53050, 95980, 588],
}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_ranks_file_is_cl100k_base_by_sha256():
    with gzip.open(tokmod.ranks_file(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
    assert digest == tokmod.CL100K_RANKS_SHA256


def test_known_ids_offline(no_network):
    tok = Tokenizer(DBRX_VOCAB_SIZE)  # built from scratch with the network refused
    assert tok.encode("hello world") == [15339, 1917]
    for text, ids in SAMPLES.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_pattern_and_specials_match_tiktokens_own_cl100k(monkeypatch):
    """Our constants equal tiktoken's definition of cl100k_base (its ranks loader stubbed out)."""
    from tiktoken_ext import openai_public

    seen = {}

    def fake_load(url, expected_hash=None):
        seen["hash"] = expected_hash
        return {b"a": 0}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    spec = openai_public.cl100k_base()
    assert spec["pat_str"] == tokmod.CL100K_PAT_STR
    assert spec["special_tokens"] == tokmod.CL100K_SPECIAL_TOKENS
    assert seen["hash"] == tokmod.CL100K_RANKS_SHA256


def test_dbrx_special_tokens_and_padded_vocabulary():
    tok = get_tokenizer()
    assert tok.vocab_size == 100352
    assert (tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id) == (100257, 100277, 100278, 100279)
    assert tok.n_defined == 100280 <= tok.vocab_size
    # Special-token text inside data stays text; chat prompts may opt in.
    assert 100278 not in tok.encode("<|im_start|>user")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", allowed_special="all")[0] == 100278
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", allowed_special="all")[-1] == 100279
    assert tok.token_id("<|pad|>") == 100277
    # Ids that name no token (cl100k's gaps, the padding rows) decode to nothing.
    assert tok.decode([15339, 100256, 100300, 100351, 1917]) == "hello world"
    assert tok.decode([100279]) == "<|im_end|>"


def test_vocab_size_too_small_is_a_clear_error():
    with pytest.raises(DataError, match="vocab_size 50000 is smaller"):
        Tokenizer(50000)


def test_pickles_small_and_shared():
    tok = get_tokenizer()
    blob = pickle.dumps(tok)
    assert len(blob) < 200  # rebuilt from the local file, not shipped
    assert pickle.loads(blob) is tok
    assert get_tokenizer(64 * 1570).vocab_size == 100480


def test_a_different_ranks_file_is_refused(tmp_path, monkeypatch):
    with gzip.open(tokmod.ranks_file(), "rb") as f:
        lines = f.read().splitlines()
    token, rank = lines[100].split()
    lines[100] = base64.b64encode(b"tampered") + b" " + rank
    bad = tmp_path / "cl100k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    monkeypatch.setattr(tokmod, "ranks_file", lambda: str(bad))
    with pytest.raises(DataError, match="sha256"):
        Tokenizer(DBRX_VOCAB_SIZE)
