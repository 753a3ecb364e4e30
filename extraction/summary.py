"""summary.json of a prepared data folder: how its features were made, read back by data.read_summary and
extraction/query.py."""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import sklearn
import torch

from data import GRID, NUM_BLOCKS
from extraction import backbones, features
from extraction.inputs import Collection, Item


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
        "dims": {"cnn": cnn_width, "bovw": args.codebook_size, "grid": f"{GRID}x{GRID}",
                 "coarse": "(N, D)", "fine": f"(N, {NUM_BLOCKS}, D), blocks row-major from the top left"},
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
