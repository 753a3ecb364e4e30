"""Checkpoints as plain dicts: written atomically, loaded with weights_only=True."""
from __future__ import annotations

import io
import os
import pickle
import re
import warnings

import torch

from runtime.errors import InputError
from runtime.files import atomic_write

REQUIRED_KEYS = ("kind", "model", "opt", "vocab", "epoch")


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half file.

    The state is serialised in memory first: torch's zip writer turns a failed write (a full disk) into a
    RuntimeError about stream positions, a plain write keeps the OSError that names the cause.
    """
    def write(f) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        f.write(buffer.getbuffer())
    atomic_write(path, write, suffix=".pth.tar")


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf (one device sync for all of them)."""
    floats = {name: t for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in floats.values()]).tolist()
    return [name for name, ok in zip(floats, finite) if not ok]


ZIP_MAGIC = b"PK\x03\x04"
TEXT = "a text file, not a checkpoint"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+) was not")
# Options a checkpoint must hold, and their types, for its subnetwork to be rebuilt and its data found.
OPT_TYPES = {"cnn_dim": int, "bovw_dim": int, "word_dim": int, "embed_size": int, "num_layers": int,
             "bi_gru": bool, "batch_size": int, "data_path": str, "data_name": str}
KIND_OPT_TYPES = {"global": {"text_pooling": str}, "local": {"raw_feature_norm": str, "lambda_softmax": (int, float)}}


def _what_the_file_is(path: str) -> str:
    """A short description of a file that torch cannot load, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(ZIP_MAGIC):
        return "a damaged or truncated checkpoint (its zip archive cannot be read)"
    try:
        head.decode("utf-8")
        return TEXT
    except UnicodeDecodeError as err:
        if err.start > len(head) - 4 and b"\0" not in head:  # a multi-byte character cut at 4096
            return TEXT
    if head[:1] == b"\x80":
        return "a pickle stream that is not a checkpoint of this project, or a damaged one"
    return "not a PyTorch checkpoint (unrecognised bytes)"


def _read(path: str) -> object:
    """torch.load with weights_only=True; any failure, whatever the bytes, is one InputError line."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stray files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise InputError(f"{path}: checkpoint cannot be read ({err.strerror or err})") from None
    except Exception as err:  # torch's readers fail with many types (IndexError, struct.error, ...)
        what = _what_the_file_is(path)
        named = _UNSUPPORTED_GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if what != TEXT and named:  # a real pickle naming a Python class or function, not stray bytes
            raise InputError(f"{path}: refused, the checkpoint holds pickled Python objects that could run code "
                             f"when loaded (it names {named.group(1)[:80]}); only plain-dict checkpoints are "
                             "loaded") from None
        raise InputError(f"{path}: {what}") from None


def _type_errors(state: dict) -> list[str]:
    """What is missing or of the wrong type in a loaded checkpoint dict, in words."""
    problems = [f"no '{key}'" for key in REQUIRED_KEYS if key not in state]
    if problems:
        return problems
    if state["kind"] not in KIND_OPT_TYPES:
        return [f"'kind' is {state['kind']!r}, not 'global' or 'local'"]
    model, opt, vocab = state["model"], state["opt"], state["vocab"]  # opt: see check_model_options
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        problems.append("'model' is not a table of named tensors")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        problems.append("'vocab' is not a table of words and indices")
    if type(state["epoch"]) is not int or state["epoch"] < 0:
        problems.append(f"'epoch' is {state['epoch']!r}, not a count")
    if not isinstance(opt, dict):
        problems.append("'opt' is not a table of options")
    return problems


def check_model_options(state: dict, path: str) -> None:
    """The options a subnetwork is rebuilt from (widths, layers, attention) are present and well typed."""
    problems = []
    for name, wanted in {**OPT_TYPES, **KIND_OPT_TYPES[state["kind"]]}.items():
        value = state["opt"].get(name)
        if not isinstance(value, wanted) or (wanted is int and (isinstance(value, bool) or value < 1)):
            problems.append(f"option '{name}' is {value!r}" if name in state["opt"] else f"no option '{name}'")
    if problems:
        raise InputError(f"{path}: not an M2HSE checkpoint, or a damaged one: {'; '.join(problems[:3])}")


def load_checkpoint(path: str, kind: str | None = None) -> dict:
    """Load a checkpoint safely; refuse pickled objects, anything that is not one of ours, damaged or ill-typed
    fields and the wrong subnetwork, each with one line."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    state = _read(path)
    if not isinstance(state, dict):
        raise InputError(f"{path}: not an M2HSE checkpoint (it holds a {type(state).__name__}, not a dict)")
    problems = _type_errors(state)
    if problems:
        raise InputError(f"{path}: not an M2HSE checkpoint, or a damaged one: {'; '.join(problems[:3])}")
    bad = nonfinite_tensors(state["model"])
    if bad:
        raise InputError(f"{path}: the weights hold NaN or inf ({', '.join(bad[:3])}); the run that saved them "
                         "diverged, use an earlier checkpoint")
    if kind is not None and state["kind"] != kind:
        raise InputError(f"{path}: this is a {state['kind']}-level checkpoint, a {kind}-level one is needed here")
    return state
