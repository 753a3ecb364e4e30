"""Which data a result was made from: absolute folders and a cheap fingerprint of their files.

A checkpoint records the fingerprint of its data folder; evaluate.py, search.py, visualize.py and
reproduce.py compare it with the files they read. The fingerprint is cheap and sufficient to notice a
replaced file: every file's size; for .npy arrays their shape, dtype and a hash of SAMPLE_ROWS rows spread
evenly over the array (read through a memory map); for text files (captions, image lists) a hash of all
their bytes.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

SAMPLE_ROWS = 64
SPLIT_FILES = ("_caps.txt", "_images.txt", "_cnns.npy", "_bovws.npy", "_labels.npy")


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a whole file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str) -> dict:
    """Size, and for arrays shape, dtype and a hash of sampled rows; for text files a hash of the whole file."""
    stamp: dict = {"bytes": os.path.getsize(path)}
    if not path.endswith(".npy"):
        return {**stamp, "sha256": sha256_file(path)}
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):  # unreadable: the size and a hash still tell a changed file
        return {**stamp, "sha256": sha256_file(path)}
    rows = np.unique(np.linspace(0, max(len(array) - 1, 0), min(SAMPLE_ROWS, len(array))).astype(np.int64))
    sample = np.ascontiguousarray(array[rows]) if array.ndim else np.ascontiguousarray(array)
    return {**stamp, "shape": list(array.shape), "dtype": str(array.dtype),
            "sampled_rows_sha256": hashlib.sha256(sample.tobytes()).hexdigest()}


def data_fingerprint(folder: str) -> dict:
    """{'folder': absolute path, 'files': {name: fingerprint}} of every split file in a data folder."""
    folder = os.path.abspath(folder)
    names = sorted(n for n in os.listdir(folder) if n.endswith(SPLIT_FILES)) if os.path.isdir(folder) else []
    return {"folder": folder, "files": {n: file_fingerprint(os.path.join(folder, n)) for n in names}}


def changed_files(recorded: dict, current: dict, split: str | None = None) -> list[str]:
    """Names of the files (of one split, or all) that differ, appeared or disappeared between two fingerprints."""
    before, now = recorded.get("files", {}), current.get("files", {})
    names = sorted(set(before) | set(now))
    if split is not None:
        names = [n for n in names if n.startswith(f"{split}_")]
    return [n for n in names if before.get(n) != now.get(n)]


def describe_change(recorded: dict, current: dict, split: str | None = None) -> str:
    """'' when the data match; else the files that differ and where the training data were, in words."""
    changed = changed_files(recorded, current, split)
    if not changed:
        return ""
    moved = f" (trained on {recorded['folder']})" if recorded.get("folder") != current["folder"] else ""
    return f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} differ from the training data{moved}"
