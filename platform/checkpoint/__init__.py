"""Checkpoints: complete and verified, or invisible.

`CheckpointStore` commits, lists, verifies, downloads, protects and prunes a
job's checkpoints on any `platform.storage` Store (local folder or S3); see
`platform.checkpoint.store` for how ranks cooperate and
`platform.checkpoint.commit` for how a checkpoint becomes visible.
`save_tensors` / `load_tensors` give the world-size-independent tensor
format, `rng_state` / `set_rng_state` the generator state, both pickle-free.
`platform.checkpoint.trainer_state` lays a training run out in them (what
training resumes from, promotion exports and serving loads), with
`placement` (which rank writes what), `snapshot` (the copy out of the engine
that training waits for) and `keys` (tensor names); it imports torch, so it
is not re-exported here: importing this package does not.
"""

from platform.checkpoint.commit import Staging
from platform.checkpoint.errors import (
    CheckpointCommitError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
)
from platform.checkpoint.manifest import MANIFEST_NAME, FileEntry, Manifest, Verify, parse_step_dir, step_dir
from platform.checkpoint.rng import rng_state, set_rng_state
from platform.checkpoint.store import CheckpointStore, CommittedCheckpoint
from platform.checkpoint.tensors import load_tensors, read_tensor_index, save_tensors

__all__ = [
    "MANIFEST_NAME",
    "CheckpointCommitError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "CommittedCheckpoint",
    "FileEntry",
    "Manifest",
    "Staging",
    "Verify",
    "load_tensors",
    "parse_step_dir",
    "read_tensor_index",
    "rng_state",
    "save_tensors",
    "set_rng_state",
    "step_dir",
]
