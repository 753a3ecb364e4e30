"""One run per output folder: the folders are locked first, then a folder holding another run is refused.

A training run writes checkpoint.pth.tar, model_best.pth.tar, performance.log, loss.log and TensorBoard
event files. A new run into a folder that holds any of them would replace the best model and mix its logs
with the old ones, so it goes on only with --resume (continue that run) or --overwrite (the old files are
moved to a timestamped subfolder first; nothing is deleted). --resume continues the run of the folder its
checkpoint lies in: in that folder, or in folders that hold no run yet.
"""
from __future__ import annotations

import os
import time

import torch

from runtime.errors import InputError, OutputError
from runtime.run_lock import RunLock

CHECKPOINTS = ("checkpoint.pth.tar", "model_best.pth.tar")
LOGS = ("performance.log", "loss.log")
EVENTS_PREFIX = "events.out.tfevents."
ARCHIVE_PREFIX = "previous-run-"


def run_files(folder: str) -> list[str]:
    """Names of the files of a training run in folder (sorted); none when the folder does not exist."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if n in CHECKPOINTS or n in LOGS or n.startswith(EVENTS_PREFIX))


def checkpoint_kind(path: str) -> str | None:
    """'global' or 'local' as a checkpoint records it, read without loading its tensors; None if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any damage: the kind is unknown, the full load reports it when the file is used
        return None
    kind = state.get("kind") if isinstance(state, dict) else None
    return kind if isinstance(kind, str) else None


def check_subnetwork(folder: str, kind: str) -> None:
    """Refuse a folder whose checkpoints belong to the other subnetwork."""
    for name in CHECKPOINTS:
        other = checkpoint_kind(os.path.join(folder, name))
        if other is not None and other != kind:
            raise InputError(f"{folder}: holds a {other}-level run ({name}); a {kind}-level run needs its own "
                             "folder: choose another --model_name / --logger_name")


def archive(folder: str, names: list[str]) -> str:
    """Move the named files of folder into a new <folder>/previous-run-<time>/ subfolder; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = os.path.join(folder, ARCHIVE_PREFIX + stamp), 1
    while os.path.lexists(target):
        n += 1
        target = os.path.join(folder, f"{ARCHIVE_PREFIX}{stamp}-{n}")
    try:
        os.makedirs(target)
        for name in names:
            os.replace(os.path.join(folder, name), os.path.join(target, name))
    except OSError as err:
        raise OutputError(f"{folder}: the previous run could not be moved to {target} ({err.strerror or err}); "
                          "its files not yet moved are where they were") from None
    return target


def _listed(names: list[str]) -> str:
    """The first two file names of a run, for a one-line message."""
    return ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")


def refusal(folder: str, names: list[str]) -> InputError:
    """The one line that stops a run into a folder holding another run, with the two ways on."""
    last = os.path.join(folder, CHECKPOINTS[0])
    resume = f"add --resume {last} to continue it, or " if CHECKPOINTS[0] in names else ""
    return InputError(f"{folder}: holds another training run ({_listed(names)}); {resume}add --overwrite to move "
                      f"it to {os.path.join(folder, ARCHIVE_PREFIX)}<time>/ and start afresh, or choose another "
                      "--model_name / --logger_name")


def foreign_resume(opt: dict, folder: str, names: list[str]) -> InputError:
    """The one line that stops --resume of another folder's checkpoint into a folder holding a run."""
    source = os.path.dirname(opt["resume"]) or "."
    return InputError(f"{folder}: holds another training run ({_listed(names)}), and --resume {opt['resume']} "
                      f"continues the run of {source}; give --model_name / --logger_name {source} to continue it "
                      "there, or folders that hold no run to continue it in new ones")


def resumes_in_place(opt: dict) -> bool:
    """Whether --resume continues the run of --model_name (its checkpoint lies in that folder)."""
    return os.path.realpath(os.path.dirname(opt["resume"]) or ".") == os.path.realpath(opt["model_name"])


def claim(opt: dict, kind: str) -> list[RunLock]:
    """Lock --model_name and --logger_name, then refuse (or archive, with --overwrite) a previous run there.

    Called before any data is read: a second run into the same folder stops at once.
    """
    if opt.get("overwrite") and opt.get("resume"):
        raise InputError("--overwrite starts a new run and --resume continues one: give one of them")
    folders: dict[str, str] = {}
    for folder in (opt["model_name"], opt["logger_name"]):
        folders.setdefault(os.path.realpath(folder), folder)
    locks: list[RunLock] = []
    try:
        for folder in folders.values():
            os.makedirs(folder, exist_ok=True)  # writable: checked just before
            locks.append(RunLock(folder))
        for folder in folders.values():
            check_subnetwork(folder, kind)
        for folder in folders.values():
            names = run_files(folder)
            if not names or (opt.get("resume") and resumes_in_place(opt)):
                continue
            if opt.get("resume"):
                raise foreign_resume(opt, folder, names)
            if not opt.get("overwrite"):
                raise refusal(folder, names)
            print(f"--overwrite: moved the previous run in {folder} to {archive(folder, names)}", flush=True)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks
