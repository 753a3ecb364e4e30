"""The heavy stages of prepare_data.py, each cached per split (extraction/stage_cache.py): the BoVW codebook
fitted on training descriptors, the BoVW histograms and the CNN features (docs/METHOD.md section 8)."""
from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from extraction import backbones, features
from extraction.stage_cache import Arrays, Progress, StageCache, file_identity
from runtime.device import resolve_device
from runtime.errors import InputError


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


def backbone_on_device(args: argparse.Namespace) -> tuple[torch.nn.Module, int, torch.device]:
    """The CNN backbone of --cnn_backbone / --cnn_weights on --device, and its feature width."""
    device = resolve_device(args.device)
    try:
        model, width = backbones.build_backbone(args.cnn_backbone, args.cnn_weights, args.seed)
    except ValueError as err:
        raise InputError(str(err)) from None
    return model.to(device), width, device
