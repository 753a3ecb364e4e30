"""Caches that heal: a damaged or stale index, embeddings file or fingerprint is rebuilt with one notice."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import search
from tests.test_faults import disk  # noqa: F401  (fixture: a real 2 MiB tmpfs where permitted)

QUERY = ("--image_row", "3", "--top", "5")


def search_once(capsys, args) -> tuple[list, str]:
    """Rows found by one search.py call in this process, and what it wrote on stderr."""
    found = search.main(["--device", "cpu", *args, *QUERY])
    return [r["row"] for r in found["results"]], capsys.readouterr().err


@pytest.fixture
def cached(untrained, tiny_data, tmp_path, capsys):
    """A search whose embeddings and index are cached in tmp_path/emb; its arguments and its results."""
    args = ["--global_ckpt", untrained["global"], "--data_path", tiny_data["coarse"], "--embeddings",
            str(tmp_path / "emb")]
    rows, _ = search_once(capsys, args)
    return args, rows, tmp_path / "emb"


DAMAGE = {
    "empty index (a full disk)": ("index_flat_captions.faiss", b"", "index_flat_captions.faiss is damaged"),
    "random index bytes": ("index_flat_captions.faiss", bytes(range(256)) * 8, "is damaged"),
    "damaged fingerprint": ("fingerprint.json", b"{not json", "fingerprint.json is damaged"),
    "truncated embeddings": ("captions.npy", b"\x93NUMPY", "captions.npy is missing or damaged"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_cache_file_is_rebuilt_with_one_notice(cached, capsys, case):
    args, rows, folder = cached
    name, payload, notice = DAMAGE[case]
    (folder / name).write_bytes(payload)
    again, err = search_once(capsys, args)
    assert again == rows and notice in err and "Traceback" not in err
    assert search_once(capsys, args) == (rows, "")  # healed: read back silently


def test_embeddings_replaced_by_other_values_of_the_same_shape_are_not_used(cached, capsys):
    args, rows, folder = cached
    captions = np.load(folder / "captions.npy")
    np.save(folder / "captions.npy", captions[::-1].copy())  # same shape, other values
    again, err = search_once(capsys, args)
    assert again == rows and "captions.npy is missing or damaged (its checksum differs)" in err


def test_an_index_that_cannot_be_saved_leaves_no_file_and_the_search_goes_on(untrained, tiny_data, disk, capsys):  # noqa: F811
    args = ["--global_ckpt", untrained["global"], "--data_path", tiny_data["coarse"], "--embeddings",
            str(disk.folder / "emb")]
    rows, _ = search_once(capsys, args)
    for name in os.listdir(disk.folder / "emb"):
        if name.startswith("index_"):
            os.remove(disk.folder / "emb" / name)
    disk.fill()
    again, err = search_once(capsys, args)
    assert again == rows and "notice: the index was not cached" in err and "cannot be written" in err
    assert not [n for n in os.listdir(disk.folder / "emb") if n.startswith(("index_", ".tmp-"))]


def test_an_index_built_from_other_embeddings_is_rebuilt_by_search(cached, capsys):
    """search.py owns its indexes: one stamped with other embeddings is refused and built again."""
    args, rows, folder = cached
    stamp_path = folder / "index_flat_captions.faiss.json"
    stamp = json.loads(stamp_path.read_text())
    stamp_path.write_text(json.dumps({**stamp, "built_from_sha256": "0" * 64}))
    again, err = search_once(capsys, args)
    assert again == rows and "was built from other embeddings; building it again" in err
    assert json.loads(stamp_path.read_text()) == stamp and search_once(capsys, args) == (rows, "")


def test_embeddings_encoded_again_keep_the_index_they_still_match(cached, capsys):
    """Writing embeddings deletes no index: search.py keeps one built from the same vectors."""
    args, rows, folder = cached
    index = folder / "index_flat_captions.faiss"
    before = (index.stat().st_ino, index.stat().st_mtime_ns)
    (folder / "fingerprint.json").write_bytes(b"{not json")  # the embeddings are encoded and written again
    again, err = search_once(capsys, args)
    assert again == rows and "fingerprint.json is damaged" in err and "building it again" not in err
    assert (index.stat().st_ino, index.stat().st_mtime_ns) == before
