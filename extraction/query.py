"""CNN features of one image file made exactly as prepare_data.py made its dataset's (docs/METHOD.md section 8):
the backbone, weights and seed recorded in the data folder's summary.json, the same views (whole image, then
the 3x3 blocks) and the same preprocessing, for search.py's queries with images from outside a split.

Retrieval scores use the CNN branch only (S_P, docs/METHOD.md section 4), so the BoVW histograms are not made.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data import read_summary
from extraction import backbones, features
from runtime.errors import InputError


@dataclass(frozen=True)
class CnnRecipe:
    """How a data folder's CNN features were made, as its summary.json records it."""
    backbone: str
    weights: str
    seed: int
    width: int
    summary: str  # the summary.json path, for messages

    def made_as(self) -> tuple[str, str, int]:
        """What the features depend on: backbone, weights, seed."""
        return self.backbone, self.weights, self.seed


def cnn_recipe(folder: str) -> CnnRecipe:
    """The recipe of a folder made by prepare_data.py, or one line saying why an outside image cannot be used."""
    path = os.path.join(folder, "summary.json")
    summary = read_summary(folder)
    if not summary:
        raise InputError(f"{path}: not found or unreadable; an image from outside the split needs the record of "
                         "how the features were made (prepare_data.py writes it): rebuild the features with "
                         "prepare_data.py, or query with --image_row or an image listed in the split")
    try:
        cnn = summary["cnn"]
        return CnnRecipe(cnn["backbone"], cnn["weights"], int(summary["parameters"]["seed"]),
                         int(summary["dims"]["cnn"]), path)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: no complete record of the CNN features ({err!r} missing or malformed); "
                         "rebuild the features with prepare_data.py") from None


def open_backbone(recipe: CnnRecipe, device: torch.device) -> torch.nn.Module:
    """The recipe's backbone on device, never downloading anything."""
    try:
        model, width = backbones.build_backbone(recipe.backbone, recipe.weights, recipe.seed, offline=True)
    except ValueError as err:
        raise InputError(f"{recipe.summary}: the features were made with {recipe.backbone} weights "
                         f"'{recipe.weights}': {err}") from None
    if width != recipe.width:
        raise InputError(f"{recipe.summary}: records {recipe.width}-wide features, but {recipe.backbone} gives "
                         f"{width}; the summary was edited or belongs to other features")
    return model.to(device)


def query_image(path: str) -> Image.Image:
    """The decoded RGB image of a file, or one line saying why it cannot be used."""
    try:
        return features.usable_rgb(path)
    except ValueError as err:
        raise InputError(f"{path}: {'not found' if str(err) == 'missing' else err}; --image takes an image "
                         "file (JPEG, PNG, TIFF, ...)") from None


def image_views(image: Image.Image, model: torch.nn.Module, device: torch.device) -> np.ndarray:
    """(10, width) features of an image: the whole image, then its 3x3 blocks row-major."""
    return features.view_features(model, features.cnn_views(image)[None], device)[0]
