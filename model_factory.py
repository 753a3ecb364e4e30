"""Build a subnetwork from options, or rebuild a trained one from its checkpoint alone."""
from __future__ import annotations

import torch
from torch import nn

from runtime.checkpoint import check_model_options, load_checkpoint
from runtime.errors import InputError
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


def untrained_model(kind: str, opt: dict, vocab_size: int) -> nn.Module:
    """The subnetwork as training starts it: the global RNG seeded with --seed, then the model built.

    The one recipe of an untrained model: training, reproduce.py's untrained row, demo.py and the tests
    all get the same initial weights from the same options.
    """
    torch.manual_seed(opt["seed"])
    return build_model(kind, opt, vocab_size)


def load_weights(model: nn.Module, weights: dict, path: str, built_from: str, why: str = "") -> None:
    """load_state_dict, or one line naming the first tensor that is missing, extra or of another shape."""
    expected = model.state_dict()
    suffix = f" ({why})" if why else ""
    for name, tensor in expected.items():
        if name not in weights:
            raise InputError(f"{path}: tensor {name} of the model built from {built_from} is missing from the "
                             f"checkpoint{suffix}")
        saved = tuple(getattr(weights[name], "shape", ()))
        if saved != tuple(tensor.shape):
            raise InputError(f"{path}: tensor {name} has shape {saved} in the checkpoint, {tuple(tensor.shape)} "
                             f"in the model built from {built_from}{suffix}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise InputError(f"{path}: tensor {extra[0]} of the checkpoint has no place in the model built from "
                         f"{built_from}{suffix}")
    model.load_state_dict(weights)


def load_trained(path: str, kind: str, device: torch.device) -> tuple[nn.Module, dict, Vocabulary]:
    """Model (eval mode, on device), checkpoint dict and vocabulary of a saved subnetwork."""
    ckpt = load_checkpoint(path, kind)
    check_model_options(ckpt, path)
    try:
        vocab = Vocabulary.from_word2idx(ckpt["vocab"])
    except InputError as err:
        raise InputError(f"{path}: damaged vocabulary in the checkpoint ({err})") from None
    model = build_model(kind, ckpt["opt"], len(vocab))
    load_weights(model, ckpt["model"], path, "its own options (the file was edited or damaged)")
    return model.to(device).eval(), ckpt, vocab
