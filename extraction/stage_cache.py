"""The resumable cache of prepare_data.py: each stage's per-image results, stored in parts of consecutive
images, under a folder named by a hash of everything the results depend on."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from runtime.files import atomic_write

Arrays = dict[str, np.ndarray]
Progress = Callable[[int], None]


def digest(value: object) -> str:
    """Short stable hash of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str | Path) -> str:
    """A file as path, size and modification time: enough to notice it was replaced."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class StageCache:
    """One stage's per-image results for one split, stored as parts of `chunk_size` consecutive images.

    The folder name carries a hash of everything the results depend on, so changed inputs or
    parameters never reuse stale parts.
    """

    def __init__(self, root: Path, stage: str, key: dict, n_items: int, chunk_size: int):
        self.folder = root / f"{stage}-{digest([key, n_items, chunk_size])}"
        self.chunks = [range(s, min(s + chunk_size, n_items)) for s in range(0, n_items, chunk_size)]
        self.n_items = n_items

    def part(self, chunk: range) -> Path:
        return self.folder / f"part-{chunk.start:08d}.npz"

    def missing(self) -> list[range]:
        return [c for c in self.chunks if not self.part(c).is_file()]

    def save(self, chunk: range, arrays: Arrays) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.part(chunk), lambda f: np.savez(f, **arrays))

    def load(self, chunk: range) -> Arrays:
        with np.load(self.part(chunk)) as part:
            return dict(part)

    def fill(self, compute: Callable[[range, Progress], Arrays], desc: str) -> None:
        """Compute every chunk not cached yet, with a progress bar that counts the cached ones as done."""
        todo = self.missing()
        done = self.n_items - sum(len(c) for c in todo)
        with tqdm(total=self.n_items, initial=done, desc=desc, unit="img", dynamic_ncols=True) as bar:
            for chunk in todo:
                self.save(chunk, compute(chunk, bar.update))
