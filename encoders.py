"""Encoders shared by the global and local subnetworks (docs/METHOD.md section 3); subnetwork.py uses them."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

L2_EPS = 1e-8
# Devices whose single-layer GRU may run on the padded batch instead of packed sequences: on CPU the
# packed backward zero-fills a full-size gradient at each of the L time steps, a cost that grows with
# L relative to the GRU's own work (which grows with the hidden size). Same numbers either way.
UNPACKED_GRU_DEVICES = ("cpu",)
# Padded when L * UNPACK_LENGTH_RATIO >= hidden size: measured 1.7x faster at L = 22, hidden 128
# (RSICD), about 10% slower at L = 9, hidden 1024 (the paper's Corel keywords).
UNPACK_LENGTH_RATIO = 32


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = L2_EPS) -> torch.Tensor:
    """The released code's L2 normalisation: x / sqrt(sum((x + eps)^2)); zero rows stay zero.

    Half-precision input (--amp) is normalised in float32, so every encoder output is float32 (float64
    stays float64): in float16 the eps rounds to 0 and a zero (padding) row became 0/0, and under CUDA
    autocast both half types gave wrong losses and NaN gradients.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x / (x + eps).pow(2).sum(dim=dim, keepdim=True).sqrt()


class VisualEncoder(nn.Module):
    """Linear projection of a visual feature (or of each of its blocks), L2-normalised."""

    def __init__(self, in_dim: int, embed_size: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_size)
        # Xavier-uniform range of the released code, bias 0.
        r = math.sqrt(6.0) / math.sqrt(in_dim + embed_size)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., embed_size), unit length on the last axis."""
        return l2norm(self.fc(features))


class TextEncoder(nn.Module):
    """Word embedding + (Bi)GRU; returns one unit vector per word, padding set to zero."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int,
                 num_layers: int = 1, bi_gru: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
        self.bi_gru = bi_gru
        self.embed_size = embed_size

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """captions (B, L) token ids, lengths (B,) -> word vectors (B, max(lengths), embed_size)."""
        embedded = self.embed(captions[:, :int(lengths.max())])
        if (self.rnn.num_layers == 1 and embedded.device.type in UNPACKED_GRU_DEVICES and torch.is_grad_enabled()
                and embedded.size(1) * UNPACK_LENGTH_RATIO >= self.embed_size):  # the gain is in the backward
            directions = self._unpacked_directions(embedded, lengths.to(embedded.device))
        else:
            packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
            words, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            directions = words.split(self.embed_size, dim=-1)
        # average the two directions, as the released code does
        words = (directions[0] + directions[1]) / 2 if self.bi_gru else directions[0]
        return l2norm(words)

    def _unpacked_directions(self, embedded: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Each GRU direction's outputs (B, L, embed_size) as packed sequences give them: zero at padding.

        The forward direction runs on the padded batch (padding comes after every true word); the
        backward direction runs forward over each caption reversed within its own length.
        """
        batch, length, _ = embedded.shape
        positions = torch.arange(length, device=embedded.device)
        true_words = (positions[None, :] < lengths[:, None])[..., None]
        start = embedded.new_zeros(1, batch, self.embed_size)
        directions = [self._one_direction(embedded, start, "")]
        if self.bi_gru:
            within = torch.where(true_words[..., 0], lengths[:, None] - 1 - positions[None, :], positions[None, :])
            rows = (within + length * torch.arange(batch, device=embedded.device)[:, None]).reshape(-1)

            def reverse(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(batch * length, -1).index_select(0, rows).view(batch, length, -1)
            directions.append(reverse(self._one_direction(reverse(embedded), start, "_reverse")))
        return [d * true_words for d in directions]

    def _one_direction(self, inputs: torch.Tensor, start: torch.Tensor, suffix: str) -> torch.Tensor:
        """Outputs of one direction of the (single-layer) GRU run forward over inputs (B, L, word_dim)."""
        weights = [getattr(self.rnn, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return torch._VF.gru(inputs, start, weights, True, 1, 0.0, self.training, False, True)[0]


def pool_words(words: torch.Tensor, lengths: torch.Tensor, mode: str = "padded_mean") -> torch.Tensor:
    """Caption vector from word vectors (B, L, d).

    padded_mean divides the sum by the batch's longest caption (released code);
    masked_mean divides by each caption's own length.
    """
    total = words.sum(dim=1)  # padding rows are zero, so this is the true-length sum
    if mode == "padded_mean":
        return total / lengths.max().to(total)
    if mode == "masked_mean":
        return total / lengths.to(total)[:, None]
    raise ValueError(f"unknown text pooling {mode!r}: use padded_mean or masked_mean")
