"""Global-level subnetwork (docs/METHOD.md sections 3-4): whole-image features against whole captions."""
from __future__ import annotations

import torch

from encoders import TwoBranchModel, pool_words


class GlobalModel(TwoBranchModel):
    """FC image encoders and BiGRU caption encoders; similarities are inner products of unit-ish vectors."""

    kind = "global"
    aux_weights = ("alpha_1", "alpha_2")

    def _caption_vectors(self, encoder, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return pool_words(encoder(captions, lengths), lengths, self.opt["text_pooling"])

    def similarities(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """S_P, S_A1, S_A2 of a batch, each (B, B), rows images.

        Captions are pooled here, on the whole batch, so padded_mean divides by the batch's longest
        caption even when the batch was gathered from several processes.
        """
        lengths, pooling = encoded["lengths"], self.opt["text_pooling"]
        c, b = encoded["cnn"], encoded["bovw"]
        t_c = pool_words(encoded["cnn_words"], lengths, pooling)
        t_b = pool_words(encoded["bovw_words"], lengths, pooling)
        return {"P": c @ t_c.T, "A1": b @ t_b.T, "A2": c @ b.T}

    def encode_primary_texts(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CNN-branch caption vectors (B, d) used for retrieval (pooled over the batch as in training)."""
        return self._caption_vectors(self.txt_cnn, captions, lengths)

    def primary_similarity(self, images: torch.Tensor, texts: torch.Tensor,
                           text_lengths: torch.Tensor | None = None, chunk: int = 1000) -> torch.Tensor:
        """S_P for all image / caption pairs (N_img, N_txt)."""
        return images @ texts.T
