"""Turn raw images, texts and labels into the precomp folders that the training scripts read.

    python prepare_data.py --corel Corel5K.7z     # -> ./data/{coarse,fine}-grained-data/corel5k_precomp/
    python prepare_data.py --manifest mydata/manifest.csv --data_name mydata_precomp
    python prepare_data.py --caption_json dataset_rsicd.json --images RSICD_images --class_lists txtclasses_rsicd \
        --cnn_backbone efficientnet_lite0       # -> rsicd_precomp, 5 captions per image

Writes, for each split present (train, dev, test), {split}_cnns.npy ((N, W) coarse, (N, 9, W) fine; W = 4096
for AlexNet, 1280 for EfficientNet-Lite0), {split}_bovws.npy ((N, K) / (N, 9, K)), {split}_caps.txt (k lines
per image: caption j describes row j // k), {split}_labels.npy and {split}_images.txt (the image of each row),
plus codebook.npy and summary.json. Work is cached in chunks of images, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import sklearn
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from extraction import backbones, features
from errors import InputError, OutputError, report_errors
from files import TEMP_PREFIX, atomic_write, check_writable
from options import resolve_device
from extraction.inputs import (SPLITS, Collection, Item, label_mapping, read_caption_json, read_class_lists,
                               read_corel, read_label_csv, read_manifest)

Arrays = dict[str, np.ndarray]
Progress = Callable[[int], None]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Extract M2HSE features (ImageNet CNN and dense-SIFT BoVW, whole "
                                            "image and 3x3 grid) from raw images into the precomp layout.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV/TSV with header image,caption,label,split (paths relative to it)")
    source.add_argument("--corel", help="Corel 5K folder or its .7z archive")
    source.add_argument("--caption_json", help="caption file dataset_<name>.json (images[].filename, split, "
                                               "sentences[].raw); needs --images and --class_lists or --label_csv")
    p.add_argument("--images", help="--caption_json: folder holding the image files")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--class_lists", help="--caption_json: folder of <class>.txt, one image file name a line")
    labels.add_argument("--label_csv", help="--caption_json: CSV with header filename,label")
    p.add_argument("--multi_label", action="store_true",
                   help="--caption_json: an image may have several labels; labels are written multi-hot (N, C)")
    p.add_argument("--captions_per_image", type=_positive,
                   help="--caption_json: keep the first K captions of each image (default: all)")
    p.add_argument("--word_list", help="Corel keyword vocabulary, one word a line (default: the dictionary file)")
    p.add_argument("--out_path", default="./data", help="writes <out>/coarse-grained-data and fine-grained-data")
    p.add_argument("--data_name", help="dataset folder name (default corel5k_precomp, <manifest>_precomp, or "
                                       "<name>_precomp for dataset_<name>.json)")
    p.add_argument("--cnn_backbone", default="alexnet", choices=tuple(backbones.BACKBONES),
                   help="alexnet: fc7, 4096-d (the paper's); efficientnet_lite0: pooled, 1280-d, weights installed")
    p.add_argument("--cnn_weights", default="imagenet",
                   help="imagenet (AlexNet: official file, downloaded once; EfficientNet-Lite0: the installed "
                        "file), random (seeded, for tests) or a .pth state dict")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch_size", type=_positive, default=16, help="images per CNN batch (10 views each)")
    p.add_argument("--workers", type=int, default=0, help="worker processes decoding images and computing SIFT")
    p.add_argument("--sift_step", type=_positive, default=8, help="pixels between dense SIFT keypoints")
    p.add_argument("--sift_size", type=_positive, default=16,
                   help="side in pixels of the patch each dense SIFT descriptor describes")
    p.add_argument("--codebook_size", type=_positive, default=500, help="visual words (BoVW width)")
    p.add_argument("--codebook_samples", type=_positive, default=100_000,
                   help="training descriptors sampled for k-means")
    p.add_argument("--seed", type=int, default=0, help="seeds descriptor sampling, k-means and random weights")
    p.add_argument("--chunk_size", type=_positive, default=128, help="images per resumable cache part")
    p.add_argument("--cache_dir", help="resume cache (default <out_path>/.cache)")
    p.add_argument("--keep_cache", action="store_true", help="keep the cache after a successful run")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="skip (and report) missing or unreadable images instead of stopping")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    if args.seed < 0:
        p.error(f"--seed must be 0 or more, got {args.seed}")
    json_only = [f"--{k}" for k in ("images", "class_lists", "label_csv", "multi_label", "captions_per_image")
                 if getattr(args, k)]
    if args.caption_json and not (args.images and (args.class_lists or args.label_csv)):
        p.error("--caption_json needs --images DIR and the labels: --class_lists DIR or --label_csv FILE")
    if not args.caption_json and json_only:
        p.error(f"{', '.join(json_only)} apply to --caption_json only")
    if args.data_name is None:
        args.data_name = default_data_name(args)
    if args.cache_dir is None:
        args.cache_dir = str(Path(args.out_path) / ".cache")
    return args


def default_data_name(args: argparse.Namespace) -> str:
    """corel5k_precomp, <manifest stem>_precomp, or <name>_precomp for dataset_<name>.json."""
    if args.corel:
        return "corel5k_precomp"
    stem = Path(args.manifest or args.caption_json).stem
    return f"{stem.removeprefix('dataset_') if args.caption_json else stem}_precomp"


# ---------------------------------------------------------------- resumable chunked cache

def digest(value: object) -> str:
    """Short stable hash of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


# ---------------------------------------------------------------- per-image work

class ImageJob(Dataset):
    """fn(image, index) for each listed image, so a DataLoader can spread decoding over workers."""

    def __init__(self, paths: list[Path], indices: range, fn: Callable):
        self.paths, self.indices, self.fn = paths, indices, fn

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = self.indices[k]
        return self.fn(features.load_rgb(self.paths[index]), index)


def _as_is(item):
    """DataLoader collate that keeps one item's numpy arrays as they are."""
    return item


def cnn_item(image, index: int) -> np.ndarray:
    return features.cnn_views(image)


def cnn_chunk(paths: list[Path], model: torch.nn.Module, device: torch.device, batch_size: int, workers: int,
              chunk: range, progress: Progress) -> Arrays:
    """Backbone features of the whole image and of its 9 blocks: {'cnn': (n, 10, width)}."""
    job = ImageJob(paths, chunk, cnn_item)
    out = []
    for views in DataLoader(job, batch_size=batch_size, num_workers=workers, collate_fn=np.stack):
        out.append(features.view_features(model, views, device))
        progress(len(views))
    return {"cnn": np.concatenate(out)}


def _map_images(paths: list[Path], chunk: range, fn: Callable, workers: int, progress: Progress) -> list:
    results = []
    for result in DataLoader(ImageJob(paths, chunk, fn), batch_size=None, num_workers=workers, collate_fn=_as_is):
        results.append(result)
        progress(1)
    return results


def sample_descriptors(image, index: int, step: int, size: int, per_image: int, seed: int) -> tuple:
    """Up to per_image dense SIFT descriptors of one image, chosen by an RNG seeded with (seed, index)."""
    _, descriptors = features.dense_sift(image, step, size)
    take = min(per_image, len(descriptors))
    chosen = np.sort(np.random.default_rng([seed, index]).choice(len(descriptors), take, replace=False))
    padded = np.zeros((per_image, features.SIFT_DIM), np.float32)
    padded[:take] = descriptors[chosen]
    return padded, take


def bovw_image(image, index: int, codebook: np.ndarray, step: int, size: int) -> np.ndarray:
    return features.image_bovw(image, codebook, step, size)


# ---------------------------------------------------------------- stages

def codebook_for(paths: list[Path], args: argparse.Namespace, cache_root: Path) -> tuple[np.ndarray, int]:
    """k-means codebook on a seeded sample of TRAINING descriptors; returns it and the sample size."""
    key = {"images": [str(p) for p in paths], "step": args.sift_step, "size": args.sift_size,
           "samples": args.codebook_samples, "seed": args.seed}
    per_image = math.ceil(args.codebook_samples / len(paths))
    stage = StageCache(cache_root / "train", "codebook_sample", key, len(paths), args.chunk_size)

    def compute(chunk: range, progress: Progress) -> Arrays:
        fn = partial(sample_descriptors, step=args.sift_step, size=args.sift_size, per_image=per_image,
                     seed=args.seed)
        results = _map_images(paths, chunk, fn, args.workers, progress)
        return {"desc": np.stack([r[0] for r in results]), "count": np.array([r[1] for r in results])}

    stage.fill(compute, "SIFT sample  train")
    parts = [stage.load(c) for c in stage.chunks]
    sample = np.concatenate([d[:n] for p in parts for d, n in zip(p["desc"], p["count"])])
    if len(sample) > args.codebook_samples:
        keep = np.random.default_rng(args.seed).choice(len(sample), args.codebook_samples, replace=False)
        sample = sample[np.sort(keep)]
    print(f"k-means: {args.codebook_size} words from {len(sample)} training descriptors")
    try:
        return features.fit_codebook(sample, args.codebook_size, args.seed), len(sample)
    except ValueError as err:
        raise InputError(str(err)) from None


def bovw_stage(paths: list[Path], split: str, codebook: np.ndarray, args: argparse.Namespace,
               cache_root: Path) -> StageCache:
    """Cached (10, K) histograms of every image of a split."""
    key = {"images": [str(p) for p in paths], "codebook": hashlib.sha256(codebook.tobytes()).hexdigest(),
           "step": args.sift_step, "size": args.sift_size}
    stage = StageCache(cache_root / split, "bovw", key, len(paths), args.chunk_size)
    fn = partial(bovw_image, codebook=codebook, step=args.sift_step, size=args.sift_size)
    stage.fill(lambda chunk, progress: {"bovw": np.stack(_map_images(paths, chunk, fn, args.workers, progress))},
               f"BoVW {split:>5}")
    return stage


def file_identity(path: str | Path) -> str:
    """A file as path, size and modification time: enough to notice it was replaced."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def weights_identity(backbone: str, weights: str, seed: int) -> str:
    """What the CNN features depend on: the backbone and its weight source."""
    if weights == "random":
        return f"{backbone} random(seed={seed})"
    source = backbones.imagenet_source(backbone) if weights == "imagenet" else weights
    return f"{backbone} {source if source.startswith('https:') else file_identity(source)}"


def cnn_stage(paths: list[Path], split: str, model: torch.nn.Module, device: torch.device,
              args: argparse.Namespace, cache_root: Path) -> StageCache:
    """Cached (10, width) CNN features of every image of a split."""
    key = {"images": [str(p) for p in paths],
           "weights": weights_identity(args.cnn_backbone, args.cnn_weights, args.seed)}
    stage = StageCache(cache_root / split, "cnn", key, len(paths), args.chunk_size)
    stage.fill(partial(cnn_chunk, paths, model, device, args.batch_size, args.workers), f"CNN  {split:>5}")
    return stage


# ---------------------------------------------------------------- inputs, outputs, summary

def read_inputs(args: argparse.Namespace, cache_root: Path) -> Collection:
    if args.caption_json:
        labels = read_class_lists(args.class_lists) if args.class_lists else read_label_csv(args.label_csv)
        return read_caption_json(args.caption_json, args.images, labels, args.class_lists or args.label_csv,
                                 args.captions_per_image, args.multi_label)
    if args.manifest:
        if args.word_list:
            raise InputError("--word_list applies to --corel only")
        return read_manifest(args.manifest)
    archive = Path(args.corel)
    unpack_to = cache_root / f"archive-{digest(file_identity(archive)) if archive.is_file() else ''}"
    return read_corel(archive, unpack_to, args.word_list)


def screen_images(items: list[Item], skip_bad: bool) -> tuple[list[Item], list[dict]]:
    """Decode every image once before any heavy work; stop on bad ones unless they are to be skipped."""
    bad = [(item, problem) for item in tqdm(items, desc="check images", unit="img", dynamic_ncols=True)
           if (problem := features.image_problem(item.image))]
    if len(bad) == 1 and not skip_bad:
        raise InputError(f"{bad[0][0].image}: {bad[0][1]}; fix or remove it, or pass --skip_bad_images")
    if bad and not skip_bad:
        listing = "\n".join(f"  {item.image}: {problem}" for item, problem in bad)
        raise InputError(f"{len(bad)} unusable image(s); fix or remove them, or pass --skip_bad_images:\n{listing}")
    for item, problem in bad:
        print(f"skipped {item.image}: {problem}")
    bad_items = {id(item) for item, _ in bad}
    dropped = [{"split": item.split, "image": str(item.image), "reason": problem} for item, problem in bad]
    return [item for item in items if id(item) not in bad_items], dropped


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
    outputs = {coarse: (stage.n_items, dim), fine: (stage.n_items, features.N_BLOCKS, dim)}
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


def recorded_weights(weights: str) -> str:
    """--cnn_weights as summary.json records it: a weight file by its absolute path, so search.py finds it."""
    return weights if weights in ("imagenet", "random") else str(Path(weights).resolve())


def summary(args: argparse.Namespace, collection: Collection, splits: dict[str, list[Item]],
            labels: dict[str, int], dropped: list[dict], n_descriptors: int, cnn_width: int) -> dict:
    """Everything needed to know how the features were made."""
    k = collection.captions_per_image
    return {
        "data_name": args.data_name,
        "source": collection.details,
        "splits": {s: {"items": len(v), "captions": k * len(v), "labels": len({n for i in v for n in i.labels})}
                   for s, v in splits.items()},
        "captions_per_image": k,
        "caption_rows": f"{k} caption lines per feature row: caption line j describes row j // {k}",
        "labels": "multi-hot (N, C)" if collection.multi_label else "one class id per row (N,)",
        "dims": {"cnn": cnn_width, "bovw": args.codebook_size, "grid": f"{features.GRID}x{features.GRID}",
                 "coarse": "(N, D)", "fine": f"(N, {features.N_BLOCKS}, D), blocks row-major from the top left"},
        "cnn": {"backbone": args.cnn_backbone, "weights": recorded_weights(args.cnn_weights),
                **backbones.BACKBONES[args.cnn_backbone].SUMMARY,
                "input": f"whole image and each block resized to {features.CNN_SIZE}x{features.CNN_SIZE} "
                         "(PIL bilinear), RGB"},
        "bovw": {"descriptor": "OpenCV SIFT on a dense keypoint grid of the grey image",
                 "sift_step": args.sift_step, "sift_size": args.sift_size,
                 "codebook": f"MiniBatchKMeans, seed {args.seed}, on {n_descriptors} descriptors of the train split",
                 "assignment": "hard (nearest centre)",
                 "normalisation": "L1; an image or block with no descriptor gets an all-zero histogram"},
        "label_mapping": labels,
        "dropped": dropped,
        "parameters": vars(args),
        "versions": {"torch": torch.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__,
                     "numpy": np.__version__},
    }


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int, torch.device]:
    """The CNN backbone on its device, and its feature width."""
    device = resolve_device(args.device)
    try:
        model, width = backbones.build_backbone(args.cnn_backbone, args.cnn_weights, args.seed)
    except ValueError as err:
        raise InputError(str(err)) from None
    return model.to(device), width, device


@report_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cache_root = Path(args.cache_dir) / args.data_name
    for folder in (args.out_path, cache_root):  # before any image is read
        check_writable(str(folder))
    collection = read_inputs(args, cache_root)
    for entry in collection.dropped:
        print(f"dropped {entry['split']} {entry['image']}: {entry['reason']}")
    items, bad = screen_images(collection.items, args.skip_bad_images)
    splits = {s: [i for i in items if i.split == s] for s in SPLITS if any(i.split == s for i in items)}
    if "train" not in splits:
        raise InputError("no usable train items: the BoVW codebook is fitted on the train split")
    labels = label_mapping([name for i in items for name in i.labels])
    model, cnn_width, device = build_model(args)
    paths = {s: [i.image for i in v] for s, v in splits.items()}

    codebook, n_descriptors = codebook_for(paths["train"], args, cache_root)
    stages = {s: {"bovw": bovw_stage(p, s, codebook, args, cache_root)} for s, p in paths.items()}
    for s, p in paths.items():
        stages[s]["cnn"] = cnn_stage(p, s, model, device, args, cache_root)

    folders = {g: Path(args.out_path) / f"{g}-grained-data" / args.data_name for g in ("coarse", "fine")}
    info = summary(args, collection, splits, labels, collection.dropped + bad, n_descriptors, cnn_width)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    remove_stale_splits(folders, splits)
    for s, v in splits.items():
        write_split(s, v, labels, collection.multi_label, stages[s], folders)
    for folder in folders.values():  # written last: a summary means the folder is complete
        atomic_write(folder / "codebook.npy", lambda f: np.save(f, codebook))
        atomic_write(folder / "summary.json", lambda f: f.write(json.dumps(info, indent=2).encode("utf-8")))
    if not args.keep_cache:
        shutil.rmtree(cache_root, ignore_errors=True)
        with contextlib.suppress(OSError):  # leave a shared or non-empty cache folder alone
            Path(args.cache_dir).rmdir()
    counts = ", ".join(f"{s} {len(v)}" for s, v in splits.items())
    print(f"wrote {counts} items, {len(labels)} labels -> {folders['coarse']} and {folders['fine']}")


if __name__ == "__main__":
    main()
