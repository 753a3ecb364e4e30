"""Run logs under --logger_name: performance.log, loss.log and TensorBoard scalars; the reader of performance.log."""
from __future__ import annotations

import os
from typing import TextIO

from runtime.errors import InputError, OutputError

PERFORMANCE_LOG = "performance.log"


def append(log: TextIO, line: str) -> None:
    """Append and flush one line; a full disk is one OutputError line, the checkpoints stay as they were."""
    try:
        log.write(line)
        log.flush()
    except OSError as err:
        raise OutputError(f"{log.name}: cannot be written ({err.strerror or err}); the checkpoints saved so "
                          "far are unchanged") from None


class RunLogger:
    """Appends one line per evaluation / logged step and mirrors the numbers to TensorBoard."""

    def __init__(self, folder: str):
        try:
            os.makedirs(folder, exist_ok=True)
            self.performance = open(os.path.join(folder, PERFORMANCE_LOG), "a", encoding="utf-8")
            self.losses = open(os.path.join(folder, "loss.log"), "a", encoding="utf-8")
        except OSError as err:
            raise InputError(f"{folder}: log directory cannot be written ({err.strerror})") from None
        from torch.utils.tensorboard import SummaryWriter  # here: readers of the logs need no torch
        self.writer = SummaryWriter(folder)

    def metrics(self, epoch: int, result: dict) -> None:
        """Label-level mAP, instance-level mAP and mR, then the rsum that selects the model, last."""
        i2t, t2i, instance = result["i2t"], result["t2i"], result["instance"]
        append(self.performance, f"epoch {epoch} i2t_mAP {i2t['mAP']:.4f} t2i_mAP {t2i['mAP']:.4f} "
                                 f"instance_i2t_mAP {instance['i2t']['mAP']:.4f} instance_t2i_mAP "
                                 f"{instance['t2i']['mAP']:.4f} instance_mR {instance['mR']:.4f} "
                                 f"rsum {result['selection']:.4f}\n")
        for prefix, metrics in (("val", result), ("val_instance", instance)):
            for direction in ("i2t", "t2i"):
                for name, value in metrics[direction].items():
                    self.writer.add_scalar(f"{prefix}/{direction}_{name}", value, epoch)
        self.writer.add_scalar("val/rsum", result["rsum"], epoch)
        self.writer.add_scalar("val_instance/rsum", instance["rsum"], epoch)

    def loss(self, epoch: int, step: int, global_step: int, terms: dict[str, float], lr: float) -> None:
        values = " ".join(f"{name} {value:.6f}" for name, value in terms.items())
        append(self.losses, f"epoch {epoch + 1} step {step} {values} lr {lr:.3e}\n")
        for name, value in terms.items():
            self.writer.add_scalar(f"train/{name}", value, global_step)
        self.writer.add_scalar("train/lr", lr, global_step)

    def close(self) -> None:
        self.performance.close()
        self.losses.close()
        self.writer.close()


def read_performance(path: str) -> list[dict[str, float]]:
    """The evaluations of a performance.log in file order, each {"epoch": e, "i2t_mAP": ..., "rsum": ...} with
    the fields its line has (older logs lack the instance-level ones); a resumed run may repeat an epoch."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: not found; the run's dev scores are read from it")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue
            try:
                record = {name: float(value) for name, value in zip(words[::2], words[1::2])}
                record["epoch"] = int(record["epoch"])
            except (KeyError, ValueError):
                raise InputError(f"{path}: line {number} is not an evaluation line "
                                 "(epoch E name value ...)") from None
            records.append(record)
    return records
