"""The checkpoint keeper of one training run: what is resumed, which epoch is best, when to stop, what is saved.

It owns the run's best dev score and its early-stop bookkeeping, and the two files of --model_name:
checkpoint.pth.tar (the last state) and model_best.pth.tar (the best epoch's state), always written as a
pair through checkpoint.save_checkpoint (atomic). The training loop (trainer.py) owns the weights and the
progress and hands the keeper the state to write.
"""
from __future__ import annotations

import math
import os

from options import SHAPE_OPTIONS, changed_options
from runtime import provenance
from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import InputError, OutputError
from runtime.files import remove_stale_temporaries
from vocab import Vocabulary, vocab_file

LAST, BEST = "checkpoint.pth.tar", "model_best.pth.tar"


class CheckpointKeeper:
    """Best dev rsum and its epoch, the reason training stopped, and the run's checkpoint files."""

    def __init__(self, opt: dict, kind: str, is_main: bool):
        self.opt, self.kind, self.is_main = opt, kind, is_main
        self.last = os.path.join(opt["model_name"], LAST)
        self.best_rsum, self.best_epoch = -math.inf, 0
        self.stop_reason = ""  # "early_stop" or "num_epochs" once stopped

    def remove_interrupted_saves(self) -> None:
        """Temporary files of a save that was killed midway (rank 0 owns the folder)."""
        for name in remove_stale_temporaries(self.opt["model_name"]) if self.is_main else []:
            print(f"removed {os.path.join(self.opt['model_name'], name)}: left by an interrupted save")

    def open_resume(self, path: str, vocab: Vocabulary, data_record: dict) -> tuple[dict, str]:
        """The checkpoint to resume, checked against this run's vocabulary, data and options; with the
        changed options that change tensor shapes (for the weights' error message)."""
        ckpt = load_checkpoint(path, self.kind)
        if ckpt["vocab"] != vocab.word2idx:
            raise InputError(f"{path}: checkpoint was trained with another vocabulary than "
                             f"{vocab_file(self.opt['vocab_path'], self.opt['data_name'])}")
        if isinstance(ckpt.get("data"), dict) and (change := provenance.describe_change(ckpt["data"], data_record)):
            print(f"notice: resuming on other data: in {data_record['folder']}, {change}", flush=True)
        changes = changed_options(ckpt["opt"], self.opt)
        if changes and not self.opt["allow_option_change"]:
            raise InputError(f"{path}: options differ from the checkpoint's: {'; '.join(changes.values())}. "
                             "Resume with the checkpoint's options, or add --allow_option_change to continue "
                             "with the new ones")
        if changes:
            print(f"notice: resuming with changed options: {'; '.join(changes.values())}")
        return ckpt, "; ".join(v for k, v in changes.items() if k in SHAPE_OPTIONS)

    def adopt(self, ckpt: dict) -> None:
        """The best score, its epoch and the stop reason of a resumed checkpoint."""
        self.best_rsum = float(ckpt["best_rsum"])
        # older checkpoints lack best_epoch: the patience count restarts at the resumed epoch
        self.best_epoch = int(ckpt.get("best_epoch", ckpt["epoch"]))
        self.stop_reason = str(ckpt.get("stop_reason", ""))

    def record(self) -> dict:
        """The keeper's part of a checkpoint."""
        return {"best_rsum": self.best_rsum, "best_epoch": self.best_epoch, "stop_reason": self.stop_reason}

    def select(self, rsum: float, epoch: int) -> bool:
        """Whether the epoch just evaluated is the best so far (then it is remembered as such)."""
        if rsum <= self.best_rsum:
            return False
        self.best_rsum, self.best_epoch = rsum, epoch
        return True

    def patience_over(self, epoch: int) -> bool:
        """--early_stop P: the dev rsum has not improved for P epochs (known to rank 0, which evaluates)."""
        patience = self.opt["early_stop"]
        return self.is_main and patience > 0 and epoch - self.best_epoch >= patience

    def stop_reason_at(self, epoch: int) -> str:
        """Why training stops after the epoch just evaluated ("num_epochs" wins a tie), or "" while it goes on."""
        if epoch >= self.opt["num_epochs"]:
            return "num_epochs"
        return "early_stop" if self.patience_over(epoch) else ""

    def conclude(self, epoch: int) -> None:
        """Note why training stops after this epoch, saved with it for reproduce.py's table."""
        self.stop_reason = self.stop_reason_at(epoch)

    def stop_line(self, epoch: int) -> str:
        """The log line saying why training stopped."""
        best = f"best dev rsum {self.best_rsum:.2f} at epoch {self.best_epoch}"
        if self.stop_reason_at(epoch) == "early_stop":
            return (f"early stop after epoch {epoch}: the dev rsum has not improved for "
                    f"{self.opt['early_stop']} epochs ({best}; --num_epochs {self.opt['num_epochs']})")
        return f"stopped at --num_epochs {self.opt['num_epochs']} ({best})"

    def write(self, state: dict, best: bool) -> None:
        """model_best (when best), then checkpoint.pth.tar: a crash between the two files leaves a checkpoint
        whose best score model_best holds."""
        try:
            if best:
                save_checkpoint(state, os.path.join(self.opt["model_name"], BEST))
            save_checkpoint(state, self.last)
        except OutputError as err:
            raise OutputError(f"{err}; {self.how_to_go_on()}") from None

    def how_to_go_on(self) -> str:
        """What a stopped run left behind and the command that continues it."""
        if not os.path.exists(self.last):
            return "no checkpoint was saved yet: free some space and run the same command again"
        return f"the last saved checkpoint {self.last} is kept: free some space and resume with the same " \
               f"command plus --resume {self.last}"

    def kept(self) -> str:
        """What a run stopped by an error leaves to go on from."""
        return f"the last good checkpoint {self.last} is kept" if os.path.exists(self.last) else \
            "no checkpoint was saved"
