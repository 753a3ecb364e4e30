"""One training batch of either subnetwork, in one read (docs/METHOD.md sections 3-5).

    inputs   cnn (B, cnn_dim) global | (B, 9, cnn_dim) local;  bovw likewise with bovw_dim;
             captions (B, L) word ids, lengths (B,);  labels (B,) or multi-hot (B, C)
    encode        four encoders, section 3 -> cnn, bovw (B, d) | (B, 9, d); cnn_words, bovw_words (B, L, d)
    similarities  section 4 -> S_P, S_A1, S_A2, each (B, B), rows images (or the CNN side); the formula of
                  each subnetwork is its `similarity` in model_global.py / model_local.py
    loss_terms    section 5 -> MSB(S_P), w1 MSB(S_A1), w2 MSB(S_A2) and their sum "loss"
                  (w: --alpha_1/2 global, --beta_1/2 local; --loss triplet swaps MSB for VSE++)

What is not the method stays outside: trainer.batch_loss runs the encoders under mixed precision (--amp)
and, under torchrun, passes `gather`, which joins every process's encodings into the global batch.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from encoders import TextEncoder, VisualEncoder
from loss import pair_loss

SIMILARITIES = ("P", "A1", "A2")  # primary, auxiliary 1 (BoVW-text), auxiliary 2 (CNN-BoVW)


class TwoBranchModel(nn.Module):
    """The four encoders of a subnetwork: CNN and BoVW image branches, each with its own text encoder.

    Subclasses set `kind` and `aux_weights` (option name -> default of the weights of S_A1 and S_A2, the
    one source of those defaults) and define `encode_primary_texts` and `similarity(name, encoded)`:
    S_P, S_A1 or S_A2 (B, B) of the outputs of `encode`, rows images.
    """

    kind = ""
    aux_weights: dict[str, float] = {}

    def __init__(self, opt: dict, vocab_size: int):
        super().__init__()
        self.opt = dict(opt)
        embed = opt["embed_size"]
        self.img_cnn = VisualEncoder(opt["cnn_dim"], embed)
        self.img_bovw = VisualEncoder(opt["bovw_dim"], embed)
        self.txt_cnn = TextEncoder(vocab_size, opt["word_dim"], embed, opt["num_layers"], opt["bi_gru"])
        self.txt_bovw = TextEncoder(vocab_size, opt["word_dim"], embed, opt["num_layers"], opt["bi_gru"])

    def encode(self, cnn: torch.Tensor, bovw: torch.Tensor, captions: torch.Tensor,
               lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-item outputs of the four encoders (image vectors or blocks, padded word vectors, lengths)."""
        return {"cnn": self.img_cnn(cnn),  # (B, d) or (B, 9, d), unit rows
                "bovw": self.img_bovw(bovw),  # (B, d) or (B, 9, d)
                "cnn_words": self.txt_cnn(captions, lengths),  # (B, max(lengths), d), zero at padding
                "bovw_words": self.txt_bovw(captions, lengths),  # (B, max(lengths), d)
                "lengths": lengths}  # (B,)

    def forward(self, cnn: torch.Tensor, bovw: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """S_P, S_A1, S_A2 (B, B) of a batch; `gather` joins the slices of all ranks into the global batch.

        Under autocast the encoders may run in half precision; their outputs (encoders.l2norm) and the
        similarities are float32.
        """
        encoded = self.encode(cnn, bovw, captions, lengths)
        if gather is not None:
            encoded = {name: gather(value) for name, value in encoded.items()}
        with torch.autocast(cnn.device.type, enabled=False):
            return self.similarities(encoded)

    def similarities(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """S_P, S_A1, S_A2 (B, B) of the outputs of `encode`."""
        return {name: self.similarity(name, encoded) for name in SIMILARITIES}

    def loss_weights(self) -> dict[str, float]:
        """Weight of each similarity's MSB term: 1 for S_P, the option values for S_A1, S_A2."""
        first, second = self.aux_weights
        return {"P": 1.0, "A1": float(self.opt[first]), "A2": float(self.opt[second])}

    def loss_terms(self, sims: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms (scalars) of the similarities of one batch; "loss" is their sum (section 5)."""
        weights = self.loss_weights()
        losses = pair_loss(torch.stack([sims[name] for name in weights]), labels, self.opt)  # one pass for all
        terms = {name: weight * loss for (name, weight), loss in zip(weights.items(), losses)}
        terms["loss"] = sum(terms.values())
        return terms

    def encode_primary_images(self, cnn: torch.Tensor) -> torch.Tensor:
        """CNN-branch image embeddings used for retrieval, one per image (or per block)."""
        return self.img_cnn(cnn)

    def encode_primary(self, cnn: torch.Tensor, captions: torch.Tensor,
                       lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Primary image and caption embeddings of a batch (the inputs of primary_similarity)."""
        return self.encode_primary_images(cnn), self.encode_primary_texts(captions, lengths)
