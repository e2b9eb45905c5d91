"""The data layer: GPT-4 BPE tokenizer, sources, Ray Data preparation, resumable batches.

    prepared = ensure_prepared(job)                 # tokenize + pack + cache (once)
    data = TrainingData(job, prepared)              # in each training worker
    for step, micro_batches in data.batches(rank, world_size, start_sequences): ...

Nothing here imports Ray or torch until it is used. The preparation functions load
lazily so that `python -m platform.data.prepare` runs its module exactly once.
"""

from model.lazy_exports import lazy_exports
from platform.data.cache import PreparedData
from platform.data.errors import DataError
from platform.data.loader import TrainingData
from platform.data.tokenizer import DBRX_SPECIAL_TOKENS, DBRX_VOCAB_SIZE, Tokenizer, get_tokenizer

_PREPARE = {name: "platform.data.prepare" for name in ("ensure_prepared", "find_prepared", "prepare_data")}

__all__ = [
    "DBRX_SPECIAL_TOKENS", "DBRX_VOCAB_SIZE", "DataError", "PreparedData", "Tokenizer", "TrainingData",
    "get_tokenizer", *_PREPARE,
]
__getattr__, __dir__ = lazy_exports(__name__, _PREPARE)
