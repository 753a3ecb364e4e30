"""Readers of raw labelled image-text collections for prepare_data.py: a generic manifest (CSV or TSV), the
Corel 5K archive (folder or .7z) and the standard caption file dataset_<name>.json with class labels.
Each reader returns the items to extract, split by split."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import InputError
from runtime.files import read_utf8

SPLITS = ("train", "dev", "test")
MANIFEST_COLUMNS = ("image", "caption", "label", "split")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Item:
    """One image with its captions (the same number for every item of a collection), categories and split."""
    image: Path
    captions: tuple[str, ...]
    labels: tuple[str, ...]
    split: str


@dataclass
class Collection:
    """What a reader found: the items, what it dropped and why, and facts for the summary.

    multi_label: labels are written multi-hot (N, C), else one category per item (N,).
    """
    items: list[Item]
    dropped: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    captions_per_image: int = 1
    multi_label: bool = False


def one_line(text: str) -> str:
    """A caption on a single line: every run of whitespace (line breaks included) becomes one space."""
    return " ".join(text.split())


def label_mapping(labels: list[str]) -> dict[str, int]:
    """Label name -> 0..C-1 in sorted order (numeric order when every name is an integer)."""
    names = sorted(set(labels))
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names.sort(key=int)
    return {name: index for index, name in enumerate(names)}


# ---------------------------------------------------------------- generic manifest

def _manifest_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = read_utf8(str(path), "manifest")
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    return list(reader.fieldnames or []), list(reader)


def read_manifest(path: str | Path) -> Collection:
    """Items of a manifest with header image,caption,label,split; image paths relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    columns, rows = _manifest_rows(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'no header'};"
                         f" the header must name {','.join(MANIFEST_COLUMNS)} (comma- or tab-separated)")
    if not rows:
        raise InputError(f"{path}: the manifest has a header but no rows")
    items = [_manifest_item(path, number, row) for number, row in enumerate(rows, 2)]
    return Collection(items, details={"manifest": str(path.resolve())})


def _manifest_item(path: Path, line: int, row: dict[str, str]) -> Item:
    values = {c: (row.get(c) or "").strip() for c in MANIFEST_COLUMNS}
    for column in MANIFEST_COLUMNS:
        if not values[column]:
            raise InputError(f"{path}: row {line}: empty '{column}'")
    if values["split"] not in SPLITS:
        raise InputError(f"{path}: row {line}: unknown split '{values['split']}' (use {', '.join(SPLITS)})")
    image = Path(values["image"])
    return Item(image if image.is_absolute() else path.parent / image,
                (one_line(values["caption"]),), (values["label"],), values["split"])


# ---------------------------------------------------------------- Corel 5K: locating the files

@dataclass
class CorelFiles:
    """The Corel 5K files found under a root folder (None where absent)."""
    root: Path
    train_list: Path | None
    test_list: Path | None
    dictionary: Path | None
    train_annot: Path | None
    test_annot: Path | None
    images: list[Path]


_PATTERNS = {
    "train_list": r".*train.*list.*\.txt",
    "test_list": r".*test.*list.*\.txt",
    "dictionary": r".*(dictionary|words|vocab\w*)\.txt",
    "train_annot": r".*train.*annot.*",
    "test_annot": r".*test.*annot.*",
}
_EXPECTED = ("corel5k_train_list.txt, corel5k_test_list.txt (lines like 1000/1000), corel5k_words.txt or "
             "corel5k_dictionary.txt (260 words), corel5k_{train,test}_annot.{mat,hvecs,txt} or a .txt "
             "keyword file beside each image, and the images in one folder per category")


def _first_match(files: list[Path], root: Path, pattern: str) -> Path | None:
    matches = [f for f in files if re.fullmatch(pattern, f.name, re.IGNORECASE)]
    return min(matches, key=lambda f: (len(f.relative_to(root).parts), str(f)), default=None)


def find_corel_files(root: Path) -> CorelFiles:
    """Detect the TagProp-style Corel 5K files anywhere under root (the shallowest match wins)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    found = {name: _first_match(others, root, pattern) for name, pattern in _PATTERNS.items()}
    absent = [name for name in ("train_list", "test_list") if found[name] is None]
    if not images:
        absent.append("images")
    if absent:
        shallow_first = sorted(others, key=lambda p: (len(p.relative_to(root).parts), str(p)))
        listing = ", ".join(str(p.relative_to(root)) for p in shallow_first[:12]) or "none"
        raise InputError(f"{root}: no Corel 5K {', '.join(absent)} found. Expected {_EXPECTED}. "
                         f"Found {len(images)} images and {len(others)} other files: {listing}")
    base = found["train_list"].parent
    if base != root and any(base in image.parents for image in images):  # the archive's own top folder
        return find_corel_files(base)
    return CorelFiles(root=root, images=images, **found)


def unpack_archive(archive: Path, target: Path) -> Path:
    """Extract a .7z archive into target once; a marker file makes an interrupted extraction start over."""
    import py7zr  # only needed for archives

    marker = target / ".complete"
    if marker.exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"extracting {archive} -> {target}")
    try:
        with py7zr.SevenZipFile(archive) as z:
            z.extractall(partial)
    except (py7zr.Bad7zFile, py7zr.DecompressionError, OSError) as err:
        raise InputError(f"{archive}: cannot extract the 7z archive ({err})") from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    marker.touch()
    return target


# ---------------------------------------------------------------- Corel 5K: lists, words and annotations

def read_words(path: Path) -> list[str]:
    """One word per line (extra columns, e.g. counts, are ignored); blank lines skipped."""
    return [line.split()[0] for line in read_utf8(str(path), "word list").splitlines() if line.strip()]


def _read_mat(path: Path, n_items: int, n_words: int) -> np.ndarray:
    from scipy.io import loadmat  # only needed for .mat annotations

    try:
        arrays = {k: v for k, v in loadmat(path).items() if isinstance(v, np.ndarray) and v.ndim == 2}
    except (NotImplementedError, ValueError, OSError) as err:
        raise InputError(f"{path}: cannot read the MATLAB file ({err})") from None
    for key in sorted(arrays, key=lambda k: "annot" not in k):
        if arrays[key].shape == (n_items, n_words):
            return arrays[key] != 0
    shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items()) or "no 2-D arrays"
    raise InputError(f"{path}: no ({n_items}, {n_words}) annotation matrix; found {shapes}")


def _read_vecs(path: Path, n_items: int, n_words: int) -> np.ndarray:
    """TagProp *vecs files: per item an int32 dimension then that many values (any 1/2/4/8-byte type)."""
    raw = path.read_bytes()
    record = len(raw) // n_items if n_items else 0
    width = (record - 4) // n_words if n_words else 0
    if record * n_items != len(raw) or width not in (1, 2, 4, 8) or 4 + width * n_words != record:
        raise InputError(f"{path}: {len(raw)} bytes do not hold {n_items} vectors of {n_words} values "
                         "(int32 dimension + values per vector)")
    rows = np.frombuffer(raw, np.uint8).reshape(n_items, record)
    dims = rows[:, :4].copy().view(np.int32)[:, 0]
    if np.any(dims != n_words):
        raise InputError(f"{path}: vector dimensions {sorted(set(dims.tolist()))[:5]} differ from the {n_words} words")
    values = rows[:, 4:].copy().view(f"u{width}")
    return values != 0


def _read_text_annotations(path: Path, n_items: int, words: list[str]) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.split() for line in f.read().splitlines()]
    if len(lines) != n_items:
        raise InputError(f"{path}: {len(lines)} annotation lines for {n_items} listed images")
    multi_hot = all(len(t) == len(words) and set(t) <= {"0", "1"} for t in lines)
    return [[w for w, v in zip(words, t) if v == "1"] for t in lines] if multi_hot else lines


def read_keywords(annot: Path | None, images: list[Path], dictionary: list[str] | None) -> list[list[str]]:
    """Keywords of each listed image, from a split's annotation file or from a .txt beside each image."""
    if annot is None:
        sidecars = [image.with_suffix(".txt") for image in images]
        absent = [str(p) for p in sidecars if not p.is_file()]
        if absent:
            raise InputError(f"no annotation file (corel5k_<split>_annot.mat/.hvecs/.txt) and no keyword file "
                             f"beside {len(absent)} images, e.g. {absent[0]}")
        return [p.read_text(encoding="utf-8", errors="replace").split() for p in sidecars]
    if annot.suffix.lower() == ".txt":
        return _read_text_annotations(annot, len(images), dictionary or [])
    if dictionary is None:
        raise InputError(f"{annot}: a binary annotation needs the dictionary file (corel5k_words.txt)")
    reader = _read_mat if annot.suffix.lower() == ".mat" else _read_vecs
    matrix = reader(annot, len(images), len(dictionary))
    return [[w for w, on in zip(dictionary, row) if on] for row in matrix]


def _image_index(corel: CorelFiles) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for image in corel.images:
        rel = image.relative_to(corel.root).with_suffix("").as_posix()
        for key in {rel, "/".join(rel.split("/")[-2:]), image.stem}:
            index.setdefault(key, []).append(image)
    return index


def resolve_images(list_file: Path, corel: CorelFiles) -> list[Path]:
    """Image file of each entry of a split list ('1000/1000', with or without an image suffix)."""
    entries = [line.strip() for line in list_file.read_text(encoding="utf-8", errors="replace").splitlines()]
    entries = [e.replace("\\", "/") for e in entries if e]
    index = _image_index(corel)
    images, unresolved = [], []
    for entry in entries:
        key = entry[: -len(Path(entry).suffix)] if Path(entry).suffix.lower() in IMAGE_SUFFIXES else entry
        candidates = index.get(key) or index.get("/".join(key.split("/")[-2:])) or []
        if len(candidates) == 1:
            images.append(candidates[0])
        else:
            unresolved.append(f"{entry} ({'ambiguous' if candidates else 'not found'})")
    if unresolved:
        raise InputError(f"{list_file}: {len(unresolved)} of {len(entries)} listed images cannot be matched to a "
                         f"file under {corel.root}: {', '.join(unresolved[:5])}")
    return images


def read_corel(path: str | Path, unpack_to: Path, word_list: str | None = None) -> Collection:
    """Corel 5K items: train list -> train, test list -> dev (the authors' 499 split); label = image folder.

    Keywords outside the word list (default: the archive's dictionary) are removed; images left with no
    keyword are dropped and reported.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".7z":
        path = unpack_archive(path, unpack_to)
    if not path.is_dir():
        raise InputError(f"{path}: not a Corel 5K folder or .7z archive")
    corel = find_corel_files(path)
    dictionary = read_words(corel.dictionary) if corel.dictionary else None
    vocabulary_file = Path(word_list) if word_list else corel.dictionary
    if vocabulary_file is None:
        raise InputError(f"{path}: no dictionary file found (corel5k_words.txt or corel5k_dictionary.txt); "
                         "pass the keyword vocabulary with --word_list FILE")
    if not vocabulary_file.is_file():
        raise InputError(f"{vocabulary_file}: word list not found")
    allowed = set(read_words(vocabulary_file))
    collection = Collection(items=[], details={
        "corel_root": str(corel.root.resolve()), "word_list": str(vocabulary_file.resolve()),
        "word_list_size": len(allowed)})
    for split, list_file, annot in (("train", corel.train_list, corel.train_annot),
                                    ("dev", corel.test_list, corel.test_annot)):
        images = resolve_images(list_file, corel)
        keywords = read_keywords(annot, images, dictionary)
        collection.details[split] = {"list": str(list_file.relative_to(corel.root)), "listed": len(images),
                                     "annotations": str(annot.relative_to(corel.root)) if annot else "per-image .txt"}
        for image, words in zip(images, keywords):
            kept = [w for w in words if w in allowed]
            rel = image.relative_to(corel.root).as_posix()
            if kept:
                collection.items.append(Item(image, (" ".join(kept),), (image.parent.name,), split))
            else:
                collection.dropped.append({"split": split, "image": rel, "keywords": words,
                                           "reason": "no keyword in the word list"})
    return collection


# ---------------------------------------------------------------- caption file dataset_<name>.json and labels

JSON_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}  # restval: COCO's extra train
LABEL_CSV_COLUMNS = ("filename", "label")


def read_class_lists(folder: str | Path) -> dict[str, list[str]]:
    """Image file name -> its classes, from a folder of <class>.txt files listing one image file name a line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: class-list folder not found")
    lists = sorted(folder.glob("*.txt"))
    if not lists:
        raise InputError(f"{folder}: no class lists (<class>.txt files, one image file name a line)")
    classes: dict[str, list[str]] = {}
    listed: dict[str, tuple[Path, int, str]] = {}  # file name -> where first listed, as written there
    for path in lists:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            name = Path(line.strip()).name
            where = listed.setdefault(name, (path, number, line.strip()))
            if where[2] != line.strip() and Path(where[2]).parent != Path(line.strip()).parent:
                raise InputError(f"{path}: line {number}: {line.strip()} and {where[2]} ({where[0].name} line "
                                 f"{where[1]}) are different images of the same file name; labels are found by "
                                 "file name, rename one of them")
            names = classes.setdefault(name, [])
            if path.stem not in names:
                names.append(path.stem)
    return classes


def read_label_csv(path: str | Path) -> dict[str, list[str]]:
    """Image file name -> its labels, from a CSV with header filename,label (one row per image and label)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: label file not found")
    columns, rows = _manifest_rows(path)
    if any(c not in columns for c in LABEL_CSV_COLUMNS):
        raise InputError(f"{path}: the header must name {','.join(LABEL_CSV_COLUMNS)}; "
                         f"found {','.join(columns) or 'none'}")
    labels: dict[str, list[str]] = {}
    for line, row in enumerate(rows, 2):
        name, label = (Path((row.get("filename") or "").strip()).name, (row.get("label") or "").strip())
        if not name or not label:
            raise InputError(f"{path}: row {line}: empty '{'filename' if not name else 'label'}'")
        if label not in labels.setdefault(name, []):
            labels[name].append(label)
    return labels


def _load_caption_json(path: Path) -> list:
    text = read_utf8(str(path), "caption file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise InputError(f"{path}: expected {{\"images\": [...]}} with one entry per image (dataset_<name>.json)")
    return data["images"]


def _json_entry(path: Path, number: int, entry: object) -> tuple[str, Path, list[str], str]:
    """File name, image path relative to the image folder, captions and split of one images[] entry."""
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"].strip():
        raise InputError(f"{path}: images[{number}] has no 'filename'")
    name = entry["filename"].strip()
    if entry.get("split") not in JSON_SPLITS:
        raise InputError(f"{path}: {name}: unknown split {entry.get('split')!r} (use train, val or test)")
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                  for s in sentences):
        raise InputError(f"{path}: {name}: 'sentences' must be a list of {{\"raw\": caption}}")
    captions = [one_line(s["raw"]) for s in sentences]
    if "" in captions:
        raise InputError(f"{path}: {name}: sentence {captions.index('')} is empty")
    folder = entry.get("filepath") or ""
    if not isinstance(folder, str):
        raise InputError(f"{path}: images[{number}] ({name}): 'filepath' must be a folder name, got {folder!r}")
    relative = Path(folder) / name  # COCO keeps the image's sub-folder in 'filepath'
    if relative.is_absolute() or ".." in relative.parts:  # would read, and reveal, files outside --images
        raise InputError(f"{path}: images[{number}] ({name}): the image path {relative} leaves the --images "
                         "folder (absolute, or with '..'); image paths must lie inside it")
    return name, relative, captions, JSON_SPLITS[entry["split"]]


def _captions_per_image(path: Path, counts: dict[str, int], wanted: int | None) -> int:
    """K: `wanted`, or every caption when all images have the same number of them."""
    fewest = min(counts, key=counts.get)
    if counts[fewest] == 0:
        raise InputError(f"{path}: {fewest} has no caption")
    if wanted is None and counts[fewest] != max(counts.values()):
        raise InputError(f"{path}: images have {counts[fewest]} to {max(counts.values())} captions ({fewest}: "
                         f"{counts[fewest]}); pass --captions_per_image K to keep the first K of each")
    if wanted is not None and counts[fewest] < wanted:
        raise InputError(f"{path}: {fewest} has {counts[fewest]} captions, fewer than --captions_per_image {wanted}")
    return wanted or counts[fewest]


def read_caption_json(path: str | Path, images: str | Path, labels: dict[str, list[str]], label_source: str,
                      captions_per_image: int | None = None, multi_label: bool = False) -> Collection:
    """Items of a dataset_<name>.json caption file (images[].filename, split, sentences[].raw).

    split val becomes dev; every image keeps its first K captions (default: all, which must then be as many
    for every image). labels maps image file names to classes (read_class_lists or read_label_csv); an image
    with no label, or with several unless multi_label, stops the run, as does a split with no image.
    """
    path, images = Path(path), Path(images)
    entries = [_json_entry(path, n, e) for n, e in enumerate(_load_caption_json(path))]
    twice = next((r for r, n in Counter(e[1] for e in entries).items() if n > 1), None)
    if twice is not None:
        raise InputError(f"{path}: {twice} is listed twice")
    _refuse_shared_file_names(path, entries)
    k = _captions_per_image(path, {name: len(captions) for name, _, captions, _ in entries}, captions_per_image)
    items = [Item(images / relative, tuple(captions[:k]),
                  _labels_of(Path(name).name, labels, label_source, multi_label), split)
             for name, relative, captions, split in entries]
    for split, json_name in (("train", "train"), ("dev", "val"), ("test", "test")):
        if not any(item.split == split for item in items):
            raise InputError(f"{path}: no images in split '{json_name}'; train, val and test all need images")
    details = {"caption_json": str(path.resolve()), "images": str(images.resolve()), "labels": label_source,
               "json_splits": {s: sum(e[3] == s for e in entries) for s in SPLITS}}
    return Collection(items, details=details, captions_per_image=k, multi_label=multi_label)


def _refuse_shared_file_names(path: Path, entries: list[tuple[str, Path, list[str], str]]) -> None:
    """Labels are looked up by file name alone: two images of one name in different folders would share them."""
    first: dict[str, tuple[int, Path]] = {}
    for number, (_, relative, _, _) in enumerate(entries):
        seen = first.setdefault(relative.name, (number, relative))
        if seen[1] != relative:
            raise InputError(f"{path}: images[{seen[0]}] ({seen[1]}) and images[{number}] ({relative}) have the same "
                             f"file name {relative.name}: class lists and label files name images by file name, so "
                             "both would take the same labels; rename one of them")


def _labels_of(name: str, labels: dict[str, list[str]], source: str, multi_label: bool) -> tuple[str, ...]:
    found = labels.get(name, [])
    if not found:
        raise InputError(f"{source}: no label for {name} (every image needs one)")
    if len(found) > 1 and not multi_label:
        raise InputError(f"{source}: {name} has {len(found)} labels ({', '.join(found)}); "
                         "pass --multi_label if an image may have several")
    return tuple(found)
