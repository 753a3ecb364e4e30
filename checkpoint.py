"""Checkpoints as plain dicts: written atomically, loaded with weights_only=True."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import torch

from errors import InputError
from files import atomic_write

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


def load_checkpoint(path: str, kind: str | None = None) -> dict:
    """Load a checkpoint safely; refuse pickled objects, corrupt files and the wrong subnetwork."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise InputError(f"{path}: refused, the checkpoint holds pickled Python objects that could run code "
                             f"when loaded ({first[:160]}); only plain-dict checkpoints are loaded") from None
        raise InputError(f"{path}: corrupt checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{path}: corrupt or truncated checkpoint ({first[:160]})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise InputError(f"{path}: not an M2HSE checkpoint (needs the keys {', '.join(REQUIRED_KEYS)})")
    bad = nonfinite_tensors(state["model"]) if isinstance(state["model"], dict) else []
    if bad:
        raise InputError(f"{path}: the weights hold NaN or inf ({', '.join(bad[:3])}); the run that saved them "
                         "diverged, use an earlier checkpoint")
    if kind is not None and state["kind"] != kind:
        raise InputError(f"{path}: this is a {state['kind']}-level checkpoint, a {kind}-level one is needed here")
    return state
