"""The precomp files prepare_data.py writes for each split, in both granularities (docs/METHOD.md section 1):
captions, image paths and labels, then the coarse (N, D) and fine (N, 9, D) features assembled from the
stage cache; codebook.npy and summary.json last."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from data import NUM_BLOCKS
from extraction.inputs import SPLITS, Item
from extraction.stage_cache import StageCache
from runtime.errors import OutputError
from runtime.files import TEMP_PREFIX, atomic_write


def allocated_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A float32 .npy memory map whose disk blocks are reserved now: a full disk fails here, not mid-copy."""
    array = open_memmap(path, "w+", np.float32, shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, array.offset + array.nbytes)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without it: write as before
                    raise
    return array


def write_views(stage: StageCache, name: str, coarse: Path, fine: Path) -> None:
    """Assemble cached (n, 10, D) parts into the coarse (n, D) and fine (n, 9, D) float32 files."""
    dim = stage.load(stage.chunks[0])[name].shape[-1]
    outputs = {coarse: (stage.n_items, dim), fine: (stage.n_items, NUM_BLOCKS, dim)}
    partial_files = {path: path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}") for path in outputs}
    arrays = {}
    try:
        for path, shape in outputs.items():
            arrays[path] = allocated_memmap(partial_files[path], shape)
        for chunk in stage.chunks:
            views = stage.load(chunk)[name]
            arrays[coarse][chunk.start:chunk.stop] = views[:, 0]
            arrays[fine][chunk.start:chunk.stop] = views[:, 1:]
        for array in arrays.values():
            array.flush()
        arrays.clear()  # close the memory maps before the files are renamed
        for path in outputs:
            os.replace(partial_files[path], path)
    except BaseException as err:
        arrays.clear()
        for tmp in partial_files.values():
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(f"{coarse} / {fine}: cannot be written ({err.strerror or err}); "
                              "the cached features are kept, rerun to resume") from None
        raise


def remove_stale_splits(folders: dict[str, Path], present: dict) -> None:
    """Delete a previous run's files of splits this input lacks, so no reader mixes them with the new ones."""
    stale = [f / f"{s}_{kind}" for f in folders.values() for s in SPLITS if s not in present
             for kind in ("caps.txt", "cnns.npy", "bovws.npy", "labels.npy", "images.txt")]
    for path in (p for p in stale if p.exists()):
        print(f"removed {path}: left by an earlier run, its split is not in this input")
        path.unlink()


def label_array(items: list[Item], labels: dict[str, int], multi_hot: bool) -> np.ndarray:
    """int64 label ids (N,), or multi-hot (N, C) of 0/1."""
    if not multi_hot:
        return np.array([labels[item.labels[0]] for item in items], dtype=np.int64)
    array = np.zeros((len(items), len(labels)), dtype=np.int64)
    for row, item in enumerate(items):
        array[row, [labels[name] for name in item.labels]] = 1
    return array


def write_split(split: str, items: list[Item], labels: dict[str, int], multi_hot: bool,
                stages: dict[str, StageCache], folders: dict[str, Path]) -> None:
    """All files of one split in both granularities; the k captions of row i are caption lines k*i .. k*i+k-1."""
    captions = "".join(caption + "\n" for item in items for caption in item.captions).encode("utf-8")
    images = "".join(f"{item.image.absolute()}\n" for item in items).encode("utf-8")
    label_ids = label_array(items, labels, multi_hot)
    for folder in folders.values():
        atomic_write(folder / f"{split}_caps.txt", lambda f: f.write(captions))
        atomic_write(folder / f"{split}_images.txt", lambda f: f.write(images))
        atomic_write(folder / f"{split}_labels.npy", lambda f: np.save(f, label_ids))
    for kind, name in (("cnns", "cnn"), ("bovws", "bovw")):
        write_views(stages[name], name, folders["coarse"] / f"{split}_{kind}.npy",
                    folders["fine"] / f"{split}_{kind}.npy")


def write_records(folders: dict[str, Path], codebook: np.ndarray, summary: dict) -> None:
    """codebook.npy and summary.json in each folder, written after the splits: a summary means it is complete."""
    for folder in folders.values():
        atomic_write(folder / "codebook.npy", lambda f: np.save(f, codebook))
        atomic_write(folder / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode("utf-8")))
