"""The one training loop of both subnetworks (docs/METHOD.md section 6): Adam, step lr, MSB losses, dev selection.

Three jobs, three places: the run's guard (folder locks, stop signals) is runtime/run_guard.py, the checkpoint keeper
(resume, best epoch, early stop, saving) is keeper.py, and the loop itself (epochs, steps, dev evaluation,
reports) is here.
"""
from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from data import PrecompDataset, length_bucketed_batches, make_loader, shuffled_batches
from keeper import BEST, LAST, CheckpointKeeper  # noqa: F401 (BEST, LAST: the run's file names, for callers)
from model_factory import load_weights, untrained_model
from options import parse_options
from runtime import distributed
from runtime import provenance
from runtime import threads
from runtime.checkpoint import nonfinite_tensors
from runtime.errors import InputError, TrainingError
from runtime.run_guard import Interrupted, RunGuard
from runtime.run_log import RunLogger
from scoring import validate
from vocab import load_vocab, vocab_file


def learning_rate(opt: dict, epoch: int) -> float:
    return opt["learning_rate"] * 0.1 ** (epoch // opt["lr_update"])


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def adam(parameters, lr: float) -> torch.optim.Adam:
    """The released code's Adam, in torch's fused kernel: one pass per tensor, the same update."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def batch_loss(model: nn.Module, batch, opt: dict, device: torch.device,
               gather=None) -> dict[str, torch.Tensor]:
    """The model's weighted loss terms of one batch (subnetwork.py), run under --amp; 'loss' is their sum.

    Under torchrun `gather` joins every rank's slice, so each rank gets the loss of the global batch.
    """
    cnn, bovw, captions, lengths, labels, _ = batch
    amp = opt.get("amp", "off")
    with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp != "off"):
        sims = model(cnn.to(device), bovw.to(device), captions.to(device), lengths.to(device), gather=gather)
    labels = labels.to(device) if gather is None else gather(labels.to(device))
    return getattr(model, "module", model).loss_terms(sims, labels)  # DDP holds the model as .module


class Trainer:
    """The loop of one training run: model, optimizer, data order and progress; its guard and keeper beside it."""

    def __init__(self, kind: str, opt: dict):
        self.kind, self.opt = kind, opt
        self.log: RunLogger | None = None  # rank 0's run logs, opened once the run is set up
        # docs/METHOD.md section 5: an anchor needs a positive and a negative in its own batch
        if opt["batch_size"] < 2:
            raise InputError(f"--batch_size {opt['batch_size']} cannot produce a loss: the MSB loss needs a "
                             "positive and a negative of another label in each batch, so at least 2 items")
        self.dist = distributed.setup(opt["device"], opt["gpuid"], opt["dist_timeout"])
        self.device = self.dist.device
        try:
            if opt["amp"] == "fp16" and self.device.type != "cuda":
                raise InputError(f"--amp fp16 needs a CUDA device, training runs on {self.device.type}; "
                                 f"use --amp bf16 or --amp off")
            self.guard = RunGuard(opt, kind, self.dist)  # the folders are locked before any data is read
            self.keeper = CheckpointKeeper(opt, kind, self.dist.is_main)
            try:
                self._load(kind)
            except BaseException:
                self.release()
                raise
        except BaseException:
            distributed.shutdown(self.dist)  # a process leaving a live process group aborts
            raise

    def _load(self, kind: str) -> None:
        """Vocabulary, data, model and optimizer, restored from --resume when given."""
        opt = self.opt
        self.keeper.remove_interrupted_saves()
        self.vocab = load_vocab(vocab_file(opt["vocab_path"], opt["data_name"]))
        self.train_set = self._dataset("train")
        if opt["relevance"] == "instance":  # the positives of an item: the captions of its own image
            self.train_set.label_by_image()
        self.val_set = self._dataset(opt["val_split"])
        self.data_record = provenance.data_fingerprint(self.train_set.folder)  # saved in every checkpoint
        if opt["batch_size"] > len(self.train_set):
            raise InputError(f"--batch_size {opt['batch_size']} is larger than the train split "
                             f"({len(self.train_set)} items in {opt['data_path']}/{opt['data_name']})")
        self._check_batches_fill_ranks()
        self.model = untrained_model(kind, opt, len(self.vocab)).to(self.device)
        self.train_model = distributed.wrap(self.model, self.dist)  # evaluated and saved: self.model
        self.optimizer = adam(self.model.parameters(), opt["learning_rate"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=opt["amp"] == "fp16")
        self.order_rng = torch.Generator().manual_seed(opt["seed"])
        self.epoch, self.step = 0, 0
        self.evaluated = True  # False between an epoch's last batch and its dev evaluation
        self.loss_sums: dict[str, float] = {}  # of the unfinished epoch, kept across a mid-epoch resume
        self.epoch_rng_state = self.order_rng.get_state()  # order RNG at the start of the unfinished epoch
        if opt["resume"]:
            self._restore(opt["resume"])
        self.log = RunLogger(opt["logger_name"]) if self.dist.is_main else None

    def _check_batches_fill_ranks(self) -> None:
        """Under torchrun every batch, the last one included, must give each process at least one item."""
        size, batch, ranks = len(self.train_set), self.opt["batch_size"], self.dist.world_size
        smallest = min(batch, size % batch or batch)
        if smallest < ranks:
            raise InputError(f"--batch_size {batch} leaves a batch of {smallest} items ({size} train items) "
                             f"for {ranks} processes; choose a batch size whose batches all have at least "
                             f"{ranks} items")

    def _dataset(self, split: str) -> PrecompDataset:
        o = self.opt
        return PrecompDataset(o["data_path"], o["data_name"], split, self.vocab, self.kind, o["cnn_dim"], o["bovw_dim"],
                              max_words=o["max_caption_words"], allow_unknown=o["allow_unknown_words"])

    def release(self) -> None:
        """Close the run logs and free the run folders for another run (also after an error)."""
        if self.log:
            self.log.close()
        self.guard.release()

    def state(self) -> dict:
        """Everything a resumed run needs, as a plain dict."""
        return {"kind": self.kind, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "opt": self.opt, "vocab": self.vocab.word2idx, "epoch": self.epoch, "step": self.step,
                **self.keeper.record(), "evaluated": self.evaluated, "order_rng": self.epoch_rng_state,
                "torch_rng": torch.get_rng_state(), "captions_per_image": self.train_set.captions_per_image,
                "scaler": self.scaler.state_dict(), "loss_sums": dict(self.loss_sums),
                "data": self.data_record}

    def _restore(self, path: str) -> None:
        ckpt, shape_changes = self.keeper.open_resume(path, self.vocab, self.data_record)
        load_weights(self.model, ckpt["model"], path, "the given options", shape_changes)
        try:  # a checkpoint of evaluate.py's kind (no optimizer) or a damaged one: one line, not a KeyError
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):  # the fp16 loss scale, for an exact resume
                self.scaler.load_state_dict(ckpt["scaler"])
            self.epoch, self.step = ckpt["epoch"], int(ckpt["step"])
            self.keeper.adopt(ckpt)
            self.evaluated = bool(ckpt.get("evaluated", True))
            self.loss_sums = {str(k): float(v) for k, v in ckpt.get("loss_sums", {}).items()}
            self.order_rng.set_state(ckpt["order_rng"])
            self.epoch_rng_state = ckpt["order_rng"]
            torch.set_rng_state(ckpt["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
            raise InputError(f"{path}: cannot be resumed, its training state is missing or damaged "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None
        if self.dist.is_main:
            print(f"resumed from {path}: epoch {self.epoch + 1}, batch {self.step}, "
                  f"best rsum {self.keeper.best_rsum:.2f}")

    def save(self, best: bool = False) -> None:
        """Write model_best (when best) and checkpoint.pth.tar as one step no stop signal can split.

        Under torchrun rank 0 alone writes (every rank holds the same weights).
        """
        bad = nonfinite_tensors(self.model.state_dict())
        if bad:
            raise self.diverged(f"the weights hold NaN or inf ({', '.join(bad[:3])}); they were not saved")
        if self.dist.is_main:
            with self.guard.holding():
                self.keeper.write(self.state(), best)

    def diverged(self, what: str) -> TrainingError:
        """The error that stops a run whose numbers left the finite range, saying what was kept."""
        return TrainingError(f"{what} at epoch {self.epoch + 1}, batch {self.step + 1}; training stopped, "
                             f"{self.keeper.kept()} (feature values too large, or --learning_rate too high?)")

    def evaluate(self) -> dict:
        """Dev metrics of both protocols; result["selection"] is the rsum of --relevance (model selection)."""
        result = validate(self.model, self.val_set, self.opt["batch_size"], self.device)
        chosen = result["instance"] if self.opt["relevance"] == "instance" else result
        result["selection"] = chosen["rsum"]
        self.log.metrics(self.epoch, result)
        return result

    def epoch_batches(self) -> list[list[int]]:
        """This epoch's index batches, drawn from the order RNG (uniform, or of similar caption lengths)."""
        if self.opt["length_buckets"]:
            lengths = [len(caption) for caption in self.train_set.captions]
            return length_bucketed_batches(lengths, self.opt["batch_size"], self.order_rng, self.opt["length_buckets"])
        return shuffled_batches(len(self.train_set), self.opt["batch_size"], self.order_rng)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the shuffled train split (continuing mid-epoch after a resume)."""
        self.model.train()
        self.order_rng.set_state(self.epoch_rng_state)  # the epoch's order is redrawn identically on resume
        batches = self.epoch_batches()
        mine = [self.dist.my_slice(batch) for batch in batches[self.step:]]  # all of it in one process
        loader = make_loader(self.train_set, self.opt["batch_size"], self.opt["workers"], mine)
        if self.step == 0:
            self.loss_sums = {}  # summed over the epoch's batches, those before a mid-epoch resume included
        totals = self.loss_sums
        count, learned = 0, False
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}", total=len(batches), initial=self.step,
                   leave=False, file=sys.stderr,
                   disable=None if self.dist.is_main else True)  # no bar off a terminal or off rank 0
        for batch in bar:
            terms = self.train_step(batch)
            learned = learned or terms["loss"] != 0
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value
            self.step, count = self.step + 1, count + 1
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            if name := self.guard.agreed_stop():
                raise Interrupted(name)  # under torchrun every rank stops after the same step
            # at least once an epoch; rank 0 alone logs
            if self.log and (self.step % self.opt["log_step"] == 0 or self.step == len(batches)):
                global_step = self.epoch * len(batches) + self.step
                self.log.loss(self.epoch, self.step, global_step, terms, self.optimizer.param_groups[0]["lr"])
        self.epoch_rng_state = self.order_rng.get_state()
        if count and not learned:
            print(f"warning: epoch {self.epoch + 1}: no batch produced a loss term (no item had both a positive and "
                  "a negative of another label in its batch: single-label data?), so nothing was learned",
                  file=sys.stderr, flush=True)
        return {name: value / max(self.step, 1) for name, value in totals.items()}

    def train_step(self, batch) -> dict[str, float]:
        terms = batch_loss(self.train_model, batch, self.opt, self.device, distributed.batch_gatherer(self.dist))
        if not torch.isfinite(terms["loss"]):
            raise self.diverged(f"the loss became {terms['loss'].item()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()  # the scaler is a no-op unless --amp fp16
        self.scaler.unscale_(self.optimizer)
        # The norm is checked even without clipping: NaN similarities give a zero loss but NaN gradients.
        max_norm = self.opt["grad_clip"] if self.opt["grad_clip"] > 0 else math.inf
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if not torch.isfinite(norm) and not self.scaler.is_enabled():  # fp16: the scaler skips such a step
            raise self.diverged(f"the gradient norm became {norm.item()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        bad = nonfinite_tensors(dict(self.model.named_parameters()))
        if bad:
            raise self.diverged(f"the weights became NaN or inf ({', '.join(bad[:3])})")
        return {name: value.item() for name, value in terms.items()}

    def fit(self) -> float:
        """Train to num_epochs; returns the best rsum on the validation split."""
        if self.epoch >= self.opt["num_epochs"] and self.evaluated and self.dist.is_main:
            print(f"this run has already trained {self.epoch} epochs, --num_epochs {self.opt['num_epochs']}: "
                  f"nothing to do (best dev rsum {self.keeper.best_rsum:.2f}); raise --num_epochs to train further",
                  flush=True)
        with self.guard.watching():
            try:
                if self.epoch == 0 and self.step == 0 and self.dist.is_main:
                    self.report(None, self.evaluate(), 0.0)
                if not self.evaluated:  # the run stopped before the last finished epoch was evaluated
                    self.select_and_save(None, 0.0)
                while self.epoch < self.opt["num_epochs"] and not self.patience_over():
                    self.run_epoch()
            except Interrupted as sig:
                self.stop(sig)
        if self.dist.is_main:
            print(self.keeper.stop_line(self.epoch), flush=True)
        return self.keeper.best_rsum

    def patience_over(self) -> bool:
        """Whether --early_stop ends training now (rank 0 decides; every rank gets its answer)."""
        return distributed.any_rank(self.dist, self.keeper.patience_over(self.epoch))

    def stop(self, sig: Interrupted) -> None:
        """Save where the run stands and exit with status 130; a further signal during this save is only noted."""
        with self.guard.holding():  # the whole save, its weight check included: Ctrl-C twice must not split it
            self.save()
        if self.dist.is_main:
            print(f"\n{sig} received at epoch {self.epoch + 1}, batch {self.step}: saved {self.keeper.last}\n"
                  f"resume with the same command plus --resume {self.keeper.last}", file=sys.stderr)
        sys.exit(130)

    def run_epoch(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.opt, self.epoch)
        start = time.time()
        losses = self.train_epoch()
        self.epoch, self.step, self.evaluated = self.epoch + 1, 0, False
        self.select_and_save(losses, start)

    def select_and_save(self, losses: dict | None, start: float) -> None:
        """Evaluate the finished epoch on dev, then save it (and as model_best when it is the best)."""
        if not self.dist.is_main:  # rank 0 evaluates and saves; the others go on to the next epoch
            self.evaluated = True
            return
        result = self.evaluate()
        is_best = self.keeper.select(result["selection"], self.epoch)
        self.evaluated = True
        self.keeper.conclude(self.epoch)
        self.save(best=is_best)
        self.report(losses, result, time.time() - start, is_best)
        self.guard.stop_if_noted_alone()  # a signal held back by the save stops the run now

    def report(self, losses: dict | None, result: dict, seconds: float, is_best: bool = False) -> None:
        """The one summary line per epoch."""
        head = f"epoch {self.epoch:3d}/{self.opt['num_epochs']}" if self.epoch else "before training"
        loss = f"loss {losses['loss']:.4f}  " if losses else ""
        print(f"{head}  {loss}i2t mAP {result['i2t']['mAP']:6.2f}  t2i mAP {result['t2i']['mAP']:6.2f}  "
              f"instance mR {result['instance']['mR']:6.2f}  rsum {result['selection']:6.2f}  "
              f"lr {self.optimizer.param_groups[0]['lr']:.1e}  {seconds:5.1f}s"
              f"{'  *best' if is_best else ''}", flush=True)


def main(kind: str, argv: list[str] | None = None) -> float:
    """Entry point of train_global.py / train_local.py."""
    trainer = Trainer(kind, parse_options(kind, argv))
    processes = f" x {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
    if trainer.dist.is_main:
        print(f"{kind}-level subnetwork on {trainer.device}{processes}: train {trainer.train_set.describe()}, "
              f"{trainer.opt['val_split']} {trainer.val_set.describe()}, vocabulary {len(trainer.vocab)}; "
              f"{threads.describe()}", flush=True)
    finished = False
    try:
        best = trainer.fit()
        finished = True
        return best
    except RuntimeError as err:
        if trainer.dist.enabled and distributed.is_communication_error(err):
            message = distributed.lost_peer_message(trainer.dist, err, trainer.keeper.last)
            raise distributed.DistributedError(message) from None
        raise
    finally:
        trainer.release()  # also after an error or an interrupt, so the same process can train there again
        distributed.shutdown(trainer.dist, finished)
