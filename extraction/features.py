"""Visual features from raw images (docs/METHOD.md section 8): CNN features (a backbone of
extraction/backbones.py) and a dense-SIFT bag of visual words, each for the whole image and for every block
of a uniform 3x3 grid (row-major, top-left first)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from data import GRID, NUM_BLOCKS

N_VIEWS = 1 + NUM_BLOCKS  # the whole image, then the blocks
CNN_SIZE = 224
SIFT_DIM = 128

Box = tuple[int, int, int, int]


# ---------------------------------------------------------------- images and the grid

def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully, as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def usable_rgb(path: str | Path) -> Image.Image:
    """The decoded RGB image, or ValueError saying why it cannot be used ('missing', 'unreadable: ...',
    'too small: ...')."""
    if not Path(path).is_file():
        raise ValueError("missing")
    try:
        image = load_rgb(path)
    except Exception as err:  # any decoder failure (truncated, not an image, decompression bomb) means unusable
        raise ValueError(f"unreadable: {err}") from None
    if min(image.size) < GRID:
        raise ValueError(f"too small: {image.width}x{image.height}, every block of the {GRID}x{GRID} grid "
                         "needs a pixel")
    return image


def image_problem(path: str | Path) -> str | None:
    """Why an image cannot be used (as usable_rgb says), or None if it can."""
    try:
        usable_rgb(path)
    except ValueError as err:
        return str(err)
    return None


def grid_boxes(width: int, height: int) -> list[Box]:
    """(left, top, right, bottom) of the 3x3 blocks, row-major; boundaries at floor(k * size / 3)."""
    xs = [k * width // GRID for k in range(GRID + 1)]
    ys = [k * height // GRID for k in range(GRID + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(GRID) for c in range(GRID)]


def block_of_points(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Grid block (0..8, row-major) holding each (x, y) point, with the same boundaries as grid_boxes."""
    xs = [k * width // GRID for k in range(1, GRID)]
    ys = [k * height // GRID for k in range(1, GRID)]
    cols = np.searchsorted(xs, points[:, 0], side="right")
    rows = np.searchsorted(ys, points[:, 1], side="right")
    return rows * GRID + cols


# ---------------------------------------------------------------- CNN views and features

def cnn_tensor(image: Image.Image) -> np.ndarray:
    """One image resized to 224x224 (PIL bilinear), as a (3, 224, 224) uint8 array (normalised later, in batches)."""
    pixels = np.asarray(image.resize((CNN_SIZE, CNN_SIZE), Image.BILINEAR), dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def cnn_views(image: Image.Image) -> np.ndarray:
    """(10, 3, 224, 224) uint8: the whole image, then each grid block cut out and resized alone."""
    views = [image] + [image.crop(box) for box in grid_boxes(*image.size)]
    return np.stack([cnn_tensor(view) for view in views])


@torch.inference_mode()
def cnn_features(model: nn.Module, batch: np.ndarray, device: torch.device) -> np.ndarray:
    """Backbone features of a (M, 3, 224, 224) uint8 batch as float32 (M, width)."""
    pixels = torch.from_numpy(batch).to(device).float().div_(255.0)
    mean = torch.tensor(model.MEAN, device=device).reshape(1, 3, 1, 1)
    std = torch.tensor(model.STD, device=device).reshape(1, 3, 1, 1)
    return model.embed((pixels - mean) / std).float().cpu().numpy()


def view_features(model: nn.Module, views: np.ndarray, device: torch.device) -> np.ndarray:
    """(n, 10, width) backbone features of n images given as their cnn_views, (n, 10, 3, 224, 224) uint8."""
    vectors = cnn_features(model, views.reshape(-1, *views.shape[2:]), device)
    return vectors.reshape(len(views), N_VIEWS, -1)


# ---------------------------------------------------------------- BoVW: dense SIFT, codebook, histograms

def dense_sift(image: Image.Image, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """SIFT descriptors of the grey image on a regular grid: one every `step` pixels, each describing a
    `size` x `size` pixel patch (its 4x4 spatial bins), patches kept inside the image.

    Returns the (K, 2) keypoint centres actually described and their (K, 128) float32 descriptors.
    """
    grey = np.asarray(image.convert("L"))
    height, width = grey.shape
    half = size // 2
    centres = [(x, y) for y in range(half, height - half + 1, step) for x in range(half, width - half + 1, step)]
    # OpenCV's descriptor spans 4 bins of 1.5 * keypoint size each, so a patch of `size` px needs size / 6
    keypoints = [cv2.KeyPoint(float(x), float(y), size / 6.0) for x, y in centres]
    keypoints, descriptors = cv2.SIFT_create().compute(grey, keypoints)
    if descriptors is None:  # OpenCV returns None, not an empty array, when no keypoint survives
        return np.zeros((0, 2), np.float32), np.zeros((0, SIFT_DIM), np.float32)
    points = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2)
    return points, descriptors.astype(np.float32)


def fit_codebook(descriptors: np.ndarray, size: int, seed: int) -> np.ndarray:
    """k-means centres (size, 128) float32 of the given descriptors (MiniBatchKMeans, seeded)."""
    if len(descriptors) < size:
        raise ValueError(f"only {len(descriptors)} SIFT descriptors were sampled for a {size}-word codebook: "
                         "lower --codebook_size or --sift_step, or raise --codebook_samples")
    from sklearn.cluster import MiniBatchKMeans  # here, not at the top: search.py's image queries skip its slow import

    kmeans = MiniBatchKMeans(n_clusters=size, random_state=seed, n_init=1, batch_size=4096)
    return kmeans.fit(descriptors).cluster_centers_.astype(np.float32)


def assign_words(descriptors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook centre (squared Euclidean) for every descriptor."""
    c = codebook.astype(np.float32)
    # |d - c|^2 without the per-descriptor constant |d|^2, which does not change the argmin
    distances = (c * c).sum(axis=1)[None, :] - 2.0 * descriptors.astype(np.float32) @ c.T
    return distances.argmin(axis=1)


def l1_normalise(counts: np.ndarray) -> np.ndarray:
    """Rows divided by their sum; an all-zero row (no descriptor) stays all zeros, never NaN."""
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, np.float32), where=totals > 0).astype(np.float32)


def bovw_histograms(points: np.ndarray, words: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """(10, size) L1-normalised histograms: whole image, then the descriptors centred in each block."""
    blocks = block_of_points(points, width, height)
    counts = np.zeros((N_VIEWS, size), np.float32)
    counts[0] = np.bincount(words, minlength=size)
    counts[1:] = np.bincount(blocks * size + words, minlength=NUM_BLOCKS * size).reshape(NUM_BLOCKS, size)
    return l1_normalise(counts)


def image_bovw(image: Image.Image, codebook: np.ndarray, step: int, size: int) -> np.ndarray:
    """(10, codebook words) BoVW histograms of one image."""
    points, descriptors = dense_sift(image, step, size)
    words = assign_words(descriptors, codebook)
    return bovw_histograms(points, words, image.width, image.height, len(codebook))
