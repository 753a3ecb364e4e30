"""Global-level subnetwork (docs/METHOD.md sections 3-4): whole-image features against whole captions."""
from __future__ import annotations

import torch

from encoders import pool_words
from subnetwork import TwoBranchModel


class GlobalModel(TwoBranchModel):
    """FC image encoders and BiGRU caption encoders; similarities are inner products of unit-ish vectors."""

    kind = "global"
    aux_weights = {"alpha_1": 0.8, "alpha_2": 0.8}  # weights of S_A1, S_A2 and their defaults (docs/METHOD.md section 5)

    def _caption_vectors(self, encoder, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return pool_words(encoder(captions, lengths), lengths, self.opt["text_pooling"])

    def similarity(self, name: str, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """S_P, S_A1 or S_A2 (B, B) of a batch, rows images.

        Captions are pooled here, on the whole batch, so padded_mean divides by the batch's longest
        caption even when the batch was gathered from several processes.
        """
        lengths, pooling = encoded["lengths"], self.opt["text_pooling"]
        if name == "A2":
            return encoded["cnn"] @ encoded["bovw"].T
        image, words = ("cnn", "cnn_words") if name == "P" else ("bovw", "bovw_words")
        return encoded[image] @ pool_words(encoded[words], lengths, pooling).T

    def encode_primary_texts(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CNN-branch caption vectors (B, d) used for retrieval (pooled over the batch as in training)."""
        return self._caption_vectors(self.txt_cnn, captions, lengths)

    def primary_similarity(self, images: torch.Tensor, texts: torch.Tensor,
                           text_lengths: torch.Tensor | None = None, chunk: int = 1000) -> torch.Tensor:
        """S_P for all image / caption pairs (N_img, N_txt)."""
        return images @ texts.T
