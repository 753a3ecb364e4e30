"""Visual features from raw images (SPEC section 8): AlexNet fc7 and a dense-SIFT bag of visual words,
each for the whole image and for every block of a uniform 3x3 grid (row-major, top-left first)."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from sklearn.cluster import MiniBatchKMeans
from torch import nn

GRID = 3
N_BLOCKS = GRID * GRID
N_VIEWS = 1 + N_BLOCKS  # the whole image, then the blocks
CNN_DIM = 4096
CNN_SIZE = 224
SIFT_DIM = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"

Box = tuple[int, int, int, int]


# ---------------------------------------------------------------- images and the grid

def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully, as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def image_problem(path: str | Path) -> str | None:
    """Why an image cannot be used ('missing', 'unreadable: ...', 'too small: ...'), or None if it can."""
    if not Path(path).is_file():
        return "missing"
    try:
        width, height = load_rgb(path).size
    except Exception as err:  # any decoder failure (truncated, not an image, decompression bomb) means unusable
        return f"unreadable: {err}"
    if min(width, height) < GRID:
        return f"too small: {width}x{height}, every block of the {GRID}x{GRID} grid needs a pixel"
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


# ---------------------------------------------------------------- CNN: AlexNet fc7

class AlexNet(nn.Module):
    """AlexNet with torchvision's module names, so the official ImageNet weight file loads strictly."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, CNN_DIM), nn.ReLU(inplace=True),
            nn.Dropout(p=0.5), nn.Linear(CNN_DIM, CNN_DIM), nn.ReLU(inplace=True),
            nn.Linear(CNN_DIM, num_classes),
        )

    def fc7(self, x: torch.Tensor) -> torch.Tensor:
        """Second 4096-d fully connected layer after its ReLU (classifier[:6])."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:6](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[6](self.fc7(x))


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(ALEXNET_URL, progress=True, check_hash=True,
                                                  weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:  # offline, refused, or a corrupt download
        raise ValueError(f"could not download the ImageNet AlexNet weights ({err}); offline? download "
                         f"{ALEXNET_URL} elsewhere and pass the file: --cnn_weights alexnet-owt-7be5be79.pth") from None


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise ValueError(f"{path}: CNN weight file not found (--cnn_weights takes imagenet, random or a file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors alike: the file is not a plain state dict
        raise ValueError(f"{path}: not a loadable state dict ({err})") from None


def build_alexnet(weights: str, seed: int = 0) -> AlexNet:
    """AlexNet in eval mode; weights: 'imagenet' (official file, downloaded once), 'random' (seeded) or a path."""
    with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the caller's RNG untouched
        torch.manual_seed(seed)
        model = AlexNet()
    if weights != "random":
        state = _imagenet_state_dict() if weights == "imagenet" else _file_state_dict(weights)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, AttributeError, TypeError) as err:
            raise ValueError(f"{weights}: not torchvision AlexNet weights ({str(err).splitlines()[0]})") from None
    return model.eval()


def cnn_tensor(image: Image.Image) -> np.ndarray:
    """One image resized to 224x224 (PIL bilinear), as a (3, 224, 224) ImageNet-normalised float32 array."""
    pixels = np.asarray(image.resize((CNN_SIZE, CNN_SIZE), Image.BILINEAR), dtype=np.float32) / 255.0
    # numpy, not torch: small tensor ops pay for thread start-up in every data-loading call
    normalised = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def cnn_views(image: Image.Image) -> np.ndarray:
    """(10, 3, 224, 224): the whole image, then each grid block cut out and resized alone."""
    views = [image] + [image.crop(box) for box in grid_boxes(*image.size)]
    return np.stack([cnn_tensor(view) for view in views])


@torch.no_grad()
def fc7_features(model: AlexNet, batch: np.ndarray, device: torch.device) -> np.ndarray:
    """fc7 of a (M, 3, 224, 224) float32 batch as float32 (M, 4096)."""
    return model.fc7(torch.from_numpy(batch).to(device)).float().cpu().numpy()


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
    counts[1:] = np.bincount(blocks * size + words, minlength=N_BLOCKS * size).reshape(N_BLOCKS, size)
    return l1_normalise(counts)


def image_bovw(image: Image.Image, codebook: np.ndarray, step: int, size: int) -> np.ndarray:
    """(10, codebook words) BoVW histograms of one image."""
    points, descriptors = dense_sift(image, step, size)
    words = assign_words(descriptors, codebook)
    return bovw_histograms(points, words, image.width, image.height, len(codebook))
