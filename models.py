"""Build a subnetwork from options, or rebuild a trained one from its checkpoint alone."""
from __future__ import annotations

import torch
from torch import nn

from checkpoint import load_checkpoint
from errors import InputError
from vocab import Vocabulary


def build_model(kind: str, opt: dict, vocab_size: int) -> nn.Module:
    """The global- or local-level subnetwork, from options."""
    if kind == "global":
        from model_global import GlobalModel
        return GlobalModel(opt, vocab_size)
    if kind == "local":
        from model_local import LocalModel
        return LocalModel(opt, vocab_size)
    raise InputError(f"unknown subnetwork kind {kind!r}")


def load_trained(path: str, kind: str, device: torch.device) -> tuple[nn.Module, dict, Vocabulary]:
    """Model (eval mode, on device), checkpoint dict and vocabulary of a saved subnetwork."""
    ckpt = load_checkpoint(path, kind)
    vocab = Vocabulary.from_word2idx(ckpt["vocab"])
    model = build_model(kind, ckpt["opt"], len(vocab))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise InputError(f"{path}: weights do not fit the {kind}-level model "
                         f"({str(err).splitlines()[0][:160]})") from None
    return model.to(device).eval(), ckpt, vocab
