"""Throughput of feature extraction on this machine's CPU:
`python -m benchmarks.bench_features [--images N] [--backbone efficientnet_lite0] [--image_dir DIR]`.

CNN: the backbone's features of the whole image and its 9 grid blocks (10 forward passes per image),
preprocessing included. BoVW: dense SIFT, nearest-word assignment and the 10 histograms per image. Images
are generated in memory at Corel 5K's size (384x256), or the first N files of --image_dir (sorted by name)
are decoded before the timing starts (decoding is timed on its own).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extraction import backbones, features
from extraction.inputs import IMAGE_SUFFIXES


def synthetic_images(count: int, width: int = 384, height: int = 256, seed: int = 0) -> list[Image.Image]:
    """Smooth random colour textures (low-resolution noise enlarged), so SIFT sees natural-ish gradients."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(count, height // 8, width // 8, 3), dtype=np.uint8)
    return [Image.fromarray(s).resize((width, height), Image.BICUBIC) for s in small]


def folder_images(folder: str, count: int) -> tuple[list[Image.Image], float]:
    """The first `count` images of a folder (sorted by name), decoded, and the decoding rate in images/s."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not paths:
        raise SystemExit(f"{folder}: no image files")
    start = time.perf_counter()
    images = [features.load_rgb(p) for p in paths]
    return images, _rate(len(images), time.perf_counter() - start)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2)


def bench_cnn(images: list[Image.Image], batch_size: int, device: torch.device, backbone: str = "alexnet") -> float:
    """Images per second for the 10 CNN vectors of each image (random weights cost the same as ImageNet's)."""
    model, _ = backbones.build_backbone(backbone, "random")
    model = model.to(device)
    features.cnn_features(model, features.cnn_views(images[0]), device)  # warm-up: allocator and kernels
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        views = np.concatenate([features.cnn_views(image) for image in images[i:i + batch_size]])
        features.cnn_features(model, views, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return _rate(len(images), time.perf_counter() - start)


def bench_bovw(images: list[Image.Image], codebook_size: int, step: int, size: int) -> float:
    """Images per second for dense SIFT + hard assignment + the 10 L1-normalised histograms."""
    _, descriptors = features.dense_sift(images[0], step, size)
    rng = np.random.default_rng(0)
    codebook = descriptors[rng.choice(len(descriptors), codebook_size, replace=len(descriptors) < codebook_size)]
    start = time.perf_counter()
    for image in images:
        features.image_bovw(image, codebook, step, size)
    return _rate(len(images), time.perf_counter() - start)


def bench_features(images: int = 16, batch_size: int = 16, device: str = "cpu", codebook_size: int = 500,
                   sift_step: int = 8, sift_size: int = 16, backbone: str = "alexnet",
                   image_dir: str | None = None) -> dict:
    """Images per second of the CNN part and of the BoVW part on generated 384x256 images or a folder's."""
    pictures, decode_rate = folder_images(image_dir, images) if image_dir else (synthetic_images(images), None)
    return {
        "device": device, "torch_threads": torch.get_num_threads(), "images": len(pictures),
        "source": image_dir or "generated", "decode_images_per_s": decode_rate,
        "image_size": f"{pictures[0].width}x{pictures[0].height}", "batch_size": batch_size, "backbone": backbone,
        "cnn_images_per_s": bench_cnn(pictures, batch_size, torch.device(device), backbone),
        "bovw_images_per_s": bench_bovw(pictures, codebook_size, sift_step, sift_size),
        "bovw": {"codebook_size": codebook_size, "sift_step": sift_step, "sift_size": sift_size},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backbone", default="alexnet", choices=tuple(backbones.BACKBONES))
    parser.add_argument("--image_dir", help="time real images: the first --images files of this folder")
    args = parser.parse_args()
    result = bench_features(args.images, args.batch_size, args.device, backbone=args.backbone,
                            image_dir=args.image_dir)
    print(json.dumps(result, indent=2))
    print(f"CNN  ({args.backbone}, whole image + 9 blocks): {result['cnn_images_per_s']} images/s")
    print(f"BoVW (dense SIFT step {result['bovw']['sift_step']}, {result['bovw']['codebook_size']} words): "
          f"{result['bovw_images_per_s']} images/s")
