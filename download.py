"""Explicit downloads (the only network access of the project).

  python download.py corel5k-text      the authors' Corel 5K captions and vocabulary from their GitHub repository

Captions go to data/{coarse,fine}-grained-data/corel5k_precomp/, the vocabulary to vocab/.
`--from_dir DIR` copies the same files from a local folder instead (offline machines).
"""
from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.request

from runtime.errors import InputError, report_errors
from runtime.files import atomic_write_bytes, check_writable
from runtime.layout import COARSE_FOLDER, FINE_FOLDER

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


def targets(data_path: str, vocab_path: str) -> dict[str, list[str]]:
    """Source file of the authors' repository -> the local paths it is written to."""
    paths = {CAPTIONS_DIR + name: [os.path.join(data_path, granularity, "corel5k_precomp", name)
                                   for granularity in (COARSE_FOLDER, FINE_FOLDER)]
             for name in CAPTIONS}
    paths[VOCAB] = [os.path.join(vocab_path, os.path.basename(VOCAB))]
    return paths


def check_no_overwrite(path: str, payload: bytes) -> None:
    """Refuse to replace a file with other content (captions prepare_data.py wrote, a vocabulary vocab.py built)."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            same = f.read() == payload
        if not same:
            raise InputError(f"{path}: already exists with other content (written by prepare_data.py or "
                             "vocab.py?); nothing was changed. Pass --force to replace it")


def checked_payload(relative: str, from_dir: str) -> bytes:
    """The file's bytes, refused unless it is UTF-8 and, for captions, has the expected number of lines."""
    payload = read_source(relative, from_dir)
    name = os.path.basename(relative)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: received file is not valid UTF-8 ({err.reason} at byte offset {err.start}); "
                         "not saved") from None
    if name in CAPTIONS and len(text.splitlines()) != CAPTIONS[name]:
        raise InputError(f"{name}: {len(text.splitlines())} captions received, {CAPTIONS[name]} expected; not saved")
    return payload


def corel5k_text(data_path: str, vocab_path: str, from_dir: str = "", force: bool = False) -> None:
    """Fetch the Corel 5K captions (both granularity folders) and the authors' vocabulary."""
    plan = targets(data_path, vocab_path)
    payloads = {relative: checked_payload(relative, from_dir) for relative in plan}
    writes = [(path, payloads[relative]) for relative, paths in plan.items() for path in paths]
    if not force:  # every check before the first write: a refusal changes nothing
        for path, payload in writes:
            check_no_overwrite(path, payload)
    for path, _ in writes:
        check_writable(os.path.dirname(path), "download folder")
    for path, payload in writes:
        atomic_write_bytes(path, payload)
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
    p.add_argument("--force", action="store_true", help="replace existing files that hold other content")
    args = p.parse_args(argv)
    corel5k_text(args.data_path, args.vocab_path, args.from_dir, args.force)


if __name__ == "__main__":
    main()
