"""Encode a split with a trained subnetwork and score every image against every caption."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data import PrecompDataset, make_loader
from metrics import retrieval_metrics
from runtime.errors import InputError


@torch.no_grad()
def encode_split(model: nn.Module, dataset: PrecompDataset, batch_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Primary embeddings of a split: its N images in row order, its k·N captions in caption order, and
    the caption lengths.

    Captions are encoded in batches of `batch_size` in caption order, as in training, because the
    released global pooling depends on the batch's longest caption; each image is encoded once.
    """
    model.eval()
    images = torch.cat([model.encode_primary_images(dataset.cnns[i:i + batch_size].to(device))
                        for i in range(0, dataset.num_images, batch_size)])
    lengths = torch.tensor([len(c) for c in dataset.captions])
    texts = None
    for _, _, captions, batch_lengths, _, ids in make_loader(dataset, batch_size):
        txt = model.encode_primary_texts(captions.to(device), batch_lengths.to(device))
        if texts is None:
            text_shape = (int(lengths.max()),) + txt.shape[2:] if txt.dim() == 3 else txt.shape[1:]
            texts = txt.new_zeros((len(dataset),) + text_shape)
        if txt.dim() == 3:
            texts[ids.to(device), :txt.size(1)] = txt
        else:
            texts[ids.to(device)] = txt
    return images, texts, lengths.to(device)


@torch.no_grad()
def similarity_matrix(model: nn.Module, dataset: PrecompDataset, batch_size: int, device: torch.device,
                      chunk: int = 1000) -> np.ndarray:
    """Primary similarity S_P (N images x k·N captions) of a split, as float64 numpy."""
    images, texts, lengths = encode_split(model, dataset, batch_size, device)
    sims = model.primary_similarity(images, texts, lengths, chunk=chunk).double().cpu().numpy()
    bad = ~np.isfinite(sims)
    if bad.any():  # NaN scores would still rank, in gallery order, into a normal-looking table
        image, caption = np.argwhere(bad)[0]
        raise InputError(f"{dataset.folder}: {int(bad.sum())} similarities of the '{dataset.split}' split are NaN "
                         f"or inf (first: image {image}, caption {caption}); feature values too large for float32?")
    return sims


def validate(model: nn.Module, dataset: PrecompDataset, batch_size: int, device: torch.device) -> dict:
    """i2t (N image queries over k·N captions) / t2i label-level metrics of a split, with rsum = i2t mAP +
    t2i mAP, and under "instance" the instance-level ones (rsum = sum of R@1/5/10, mR)."""
    sims = similarity_matrix(model, dataset, batch_size, device)
    labels = dataset.labels.numpy(), dataset.caption_labels.numpy()
    return {**retrieval_metrics(sims, *labels), "instance": retrieval_metrics(sims, *labels, relevance="instance")}
