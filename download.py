"""Explicit downloads (the only network access of the project).

  python download.py corel5k-text      the authors' Corel 5K captions and vocabulary from their GitHub repository

Captions go to data/{coarse,fine}-grained-data/corel5k_precomp/, the vocabulary to vocab/.
`--from_dir DIR` copies the same files from a local folder instead (offline machines).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import urllib.error
import urllib.request

from errors import InputError, report_errors

REPOSITORY = "https://raw.githubusercontent.com/peixinlei/M2HSE/{branch}/"
BRANCHES = ("main", "master")
CAPTIONS = {"train_caps.txt": 4493, "dev_caps.txt": 499}  # file -> expected caption count
CAPTIONS_DIR = "data/coarse-grained-data/corel5k_precomp/"
VOCAB = "vocab/corel5k_precomp_vocab.json"


def fetch(relative: str, timeout: float = 30.0) -> bytes:
    """Bytes of a file of the authors' repository, trying its usual branch names."""
    errors = []
    for branch in BRANCHES:
        url = REPOSITORY.format(branch=branch) + relative
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            errors.append(f"{url}: HTTP {err.code}")
        except (urllib.error.URLError, OSError) as err:
            raise InputError(f"cannot reach {url} ({getattr(err, 'reason', err)}); are you offline? "
                             "Copy the files from a machine that is online and use --from_dir") from None
    raise InputError("download failed: " + "; ".join(errors))


def read_source(relative: str, from_dir: str) -> bytes:
    if not from_dir:
        return fetch(relative)
    path = os.path.join(from_dir, os.path.basename(relative))
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found (expected {', '.join([*CAPTIONS, os.path.basename(VOCAB)])})")
    with open(path, "rb") as f:
        return f.read()


def write_atomic(path: str, payload: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def corel5k_text(data_path: str, vocab_path: str, from_dir: str = "") -> None:
    """Fetch the Corel 5K captions (both granularity folders) and the authors' vocabulary."""
    for name, expected in CAPTIONS.items():
        payload = read_source(CAPTIONS_DIR + name, from_dir)
        count = len(payload.decode("utf-8").splitlines())
        if count != expected:
            raise InputError(f"{name}: {count} captions received, {expected} expected; not saved")
        for granularity in ("coarse-grained-data", "fine-grained-data"):
            write_atomic(os.path.join(data_path, granularity, "corel5k_precomp", name), payload)
    write_atomic(os.path.join(vocab_path, os.path.basename(VOCAB)), read_source(VOCAB, from_dir))
    print(f"Corel 5K captions -> {data_path}/{{coarse,fine}}-grained-data/corel5k_precomp/, "
          f"vocabulary -> {vocab_path}/{os.path.basename(VOCAB)}\n"
          "The features are not public: build them with prepare_data.py (see docs/DATA_PREPARATION.md).")


@report_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Download the authors' released files.")
    p.add_argument("what", choices=("corel5k-text",))
    p.add_argument("--data_path", default="./data")
    p.add_argument("--vocab_path", default="./vocab")
    p.add_argument("--from_dir", default="", help="copy the files from this folder instead of downloading")
    args = p.parse_args(argv)
    corel5k_text(args.data_path, args.vocab_path, args.from_dir)


if __name__ == "__main__":
    main()
