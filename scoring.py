"""Encode a split with a trained subnetwork and score every image against every caption."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data import PrecompDataset, make_loader
from metrics import retrieval_metrics


@torch.no_grad()
def encode_split(model: nn.Module, dataset: PrecompDataset, batch_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Primary image and caption embeddings of every item in dataset order, with caption lengths.

    Captions are encoded in batches of `batch_size` in dataset order, as in training, because the
    released global pooling depends on the batch's longest caption.
    """
    model.eval()
    lengths = torch.tensor([len(c) for c in dataset.captions])
    images, texts = None, None
    for cnn, _, captions, batch_lengths, _, ids in make_loader(dataset, batch_size):
        img, txt = model.encode_primary(cnn.to(device), captions.to(device), batch_lengths.to(device))
        if images is None:
            images = img.new_zeros((len(dataset),) + img.shape[1:])
            text_shape = (int(lengths.max()),) + txt.shape[2:] if txt.dim() == 3 else txt.shape[1:]
            texts = txt.new_zeros((len(dataset),) + text_shape)
        images[ids.to(device)] = img
        if txt.dim() == 3:
            texts[ids.to(device), :txt.size(1)] = txt
        else:
            texts[ids.to(device)] = txt
    return images, texts, lengths.to(device)


@torch.no_grad()
def similarity_matrix(model: nn.Module, dataset: PrecompDataset, batch_size: int, device: torch.device,
                      chunk: int = 1000) -> np.ndarray:
    """Primary similarity S_P (N images x N captions) of a split, as float64 numpy."""
    images, texts, lengths = encode_split(model, dataset, batch_size, device)
    sims = model.primary_similarity(images, texts, lengths, chunk=chunk)
    return sims.double().cpu().numpy()


def validate(model: nn.Module, dataset: PrecompDataset, batch_size: int, device: torch.device) -> dict:
    """i2t / t2i metrics of a split, with rsum = i2t mAP + t2i mAP."""
    labels = dataset.labels.numpy()
    return retrieval_metrics(similarity_matrix(model, dataset, batch_size, device), labels, labels)
