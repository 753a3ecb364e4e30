"""Injected faults: full disks, stale temporaries, umask, early output checks, numeric
flags, resumed runs with other options or shapes, foreign vocabularies, bad UTF-8, and the rough edges."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import download
import evaluate
import evaluation
import model_factory
import options
import prepare_data
import trainer
import vocab as vocab_cli
from data import PrecompDataset
from extraction.inputs import read_manifest
from extraction.stage_cache import StageCache
from extraction.writers import write_views
from runtime import files
from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import InputError, OutputError
from runtime.files import atomic_write, atomic_write_bytes, read_utf8, remove_stale_temporaries
from tests.conftest import REPO, train_argv
from vocab import Vocabulary, load_vocab, read_captions, vocab_file

ENOSPC = os.strerror(errno.ENOSPC)


class NoSpaceFile:
    """A file object whose writes fail as on a full disk (used where no tmpfs can be mounted)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        if len(data):
            raise OSError(errno.ENOSPC, ENOSPC)
        return 0

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class Disk:
    """A folder on a small filesystem; fill() uses up its free space."""

    def __init__(self, folder: Path, real: bool, monkeypatch):
        self.folder, self.real, self.monkeypatch = folder, real, monkeypatch

    def fill(self) -> None:
        if not self.real:  # simulated: later writes there through os.fdopen or fallocate fail with ENOSPC
            real_fdopen = os.fdopen
            self.monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: NoSpaceFile(real_fdopen(fd, *a, **k))
                                     if self.holds(fd) else real_fdopen(fd, *a, **k))
            self.monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
            return
        with open(self.folder / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as err:
                assert err.errno == errno.ENOSPC

    def holds(self, fd: int) -> bool:
        """Whether an open file lies in this folder (every file counts where /proc is absent)."""
        link = f"/proc/self/fd/{fd}"
        return not os.path.exists(link) or os.path.realpath(link).startswith(os.path.realpath(self.folder))

    def names(self) -> set[str]:
        return set(os.listdir(self.folder)) - {"filler"}


def no_space(*args):
    raise OSError(errno.ENOSPC, ENOSPC)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """A real 2 MiB tmpfs where mounting is permitted (root on Linux), else a simulated one."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        real = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
    except OSError:
        real = False
    yield Disk(folder, real, monkeypatch)
    if real:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: files a test left open


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A global run of one epoch on the tiny data."""
    run_dir = tmp_path_factory.mktemp("trained")
    trainer.main("global", train_argv("global", tiny_data, str(run_dir), "--num_epochs", "1"))
    return run_dir


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- full disk, temporaries, umask

def test_atomic_write_on_a_full_disk_keeps_the_old_file(disk):
    path = disk.folder / "old.json"
    atomic_write_bytes(str(path), b'{"old": 1}')
    disk.fill()
    with pytest.raises(OutputError, match=f"old.json: cannot be written \\({ENOSPC}\\); the previous file"):
        atomic_write(str(path), lambda f: f.write(b"x" * 100_000))
    assert path.read_bytes() == b'{"old": 1}' and disk.names() == {"old.json"}


def test_evaluate_on_a_full_disk_is_one_line_and_leaves_no_file(disk, trained, tiny_data, tmp_path, capsys):
    output = disk.folder / "eval.json"
    output.write_text("previous results")
    disk.fill()
    argv = ["--global_ckpt", str(trained / "model_best.pth.tar"), "--device", "cpu", "--output", str(output)]
    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    assert stop.value.code == 2
    assert f"eval.json: cannot be written ({ENOSPC})" in one_error_line(capsys)
    assert output.read_text() == "previous results" and disk.names() == {"eval.json"}
    sims = disk.folder / "sims"
    with pytest.raises(SystemExit):  # the JSON fits elsewhere, the matrices do not
        evaluate.main(argv[:-1] + [str(tmp_path / "eval.json"), "--save_sims", str(sims)])
    assert "global_test_sims.npy: cannot be written" in one_error_line(capsys)
    assert json.loads((tmp_path / "eval.json").read_text())["split"] == "test" and os.listdir(sims) == []


def test_vocab_on_a_full_disk_keeps_the_old_vocabulary(disk, tiny_data, capsys):
    shutil.copy(vocab_file(tiny_data["vocab"], tiny_data["name"]), disk.folder)
    before = (disk.folder / f"{tiny_data['name']}_vocab.json").read_bytes()
    disk.fill()
    with pytest.raises(SystemExit):
        vocab_cli.main(["--data_path", tiny_data["coarse"], "--data_name", tiny_data["name"],
                        "--vocab_path", str(disk.folder), "--threshold", "2"])
    assert "_vocab.json: cannot be written" in one_error_line(capsys)
    assert (disk.folder / f"{tiny_data['name']}_vocab.json").read_bytes() == before
    assert disk.names() == {f"{tiny_data['name']}_vocab.json"}


def test_training_on_a_full_disk_keeps_the_last_checkpoint(disk, trained, tiny_data, tmp_path):
    shutil.copy(trained / "checkpoint.pth.tar", disk.folder)
    argv = train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "2", "--model_name", str(disk.folder),
                      "--resume", str(disk.folder / "checkpoint.pth.tar"))
    run = trainer.Trainer("global", options.parse_options("global", argv))
    disk.fill()  # the disk fills up during the run
    with pytest.raises(OutputError, match=f"(model_best|checkpoint).pth.tar: cannot be written \\({ENOSPC}\\)"):
        run.fit()
    run.release()
    assert load_checkpoint(str(disk.folder / "checkpoint.pth.tar"))["epoch"] == 1
    assert disk.names() == {"checkpoint.pth.tar", ".lock"}


def test_a_run_started_on_a_full_disk_stops_before_any_work(disk, tiny_data, tmp_path, monkeypatch):
    disk.fill()
    if not disk.real:  # the lock line is written with os.write
        real_write = os.write
        monkeypatch.setattr(os, "write", lambda fd, data: no_space() if disk.holds(fd) else real_write(fd, data))
    with pytest.raises(OutputError, match=f"\\.lock: the run's lock file cannot be written \\({ENOSPC}\\)"):
        trainer.main("global", train_argv("global", tiny_data, str(tmp_path), "--model_name", str(disk.folder)))


def test_feature_files_on_a_full_disk_leave_no_partial_file(disk, tmp_path):
    stage = StageCache(tmp_path / "cache", "cnn", {}, n_items=20, chunk_size=8)
    for chunk in stage.chunks:
        stage.save(chunk, {"cnn": np.ones((len(chunk), 10, 4096), np.float32)})
    coarse, fine = disk.folder / "train_cnns.npy", disk.folder / "fine_train_cnns.npy"
    coarse.write_bytes(b"previous")
    disk.fill()
    with pytest.raises(OutputError, match="cannot be written.*the cached features are kept"):
        write_views(stage, "cnn", coarse, fine)
    assert coarse.read_bytes() == b"previous" and disk.names() == {"train_cnns.npy"}
    assert stage.missing() == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    dead, alive = f".tmp-{dead_pid()}-a.pth.tar", f".tmp-{os.getppid()}-b.pth.tar"
    for name in (dead, alive, ".tmp-notapid", "checkpoint.pth.tar"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([alive, ".tmp-notapid", "checkpoint.pth.tar"])


def test_a_killed_save_is_cleaned_up_on_the_next_start(tiny_data, tmp_path, capsys):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from runtime.files import atomic_write; "
            "atomic_write(sys.argv[2], lambda f: (f.write(b'x' * 3_000_000), f.flush(), time.sleep(60)))")
    process = subprocess.Popen([sys.executable, "-c", code, REPO, str(tmp_path / "checkpoint.pth.tar")])
    deadline = time.time() + 60
    while not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    leftover = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert len(leftover) == 1 and (tmp_path / leftover[0]).stat().st_size > 0
    trainer.Trainer("global", options.parse_options("global", train_argv("global", tiny_data, str(tmp_path))))
    assert f"removed {tmp_path / leftover[0]}: left by an interrupted save" in capsys.readouterr().out
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_checkpoint({"kind": "global", "model": {}, "opt": {}, "vocab": {}, "epoch": 0}, str(tmp_path / "c.pth"))
        atomic_write_bytes(str(tmp_path / "v.json"), b"{}")
        download.corel5k_text(str(tmp_path / "data"), str(tmp_path / "vocab"), authors_files(tmp_path / "src"))
    finally:
        os.umask(previous)
    written = [tmp_path / "c.pth", tmp_path / "v.json", tmp_path / "vocab" / "corel5k_precomp_vocab.json",
               tmp_path / "data" / "fine-grained-data" / "corel5k_precomp" / "dev_caps.txt"]
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(mode)] * 4


def test_downloaded_cnn_weights_follow_the_umask(tmp_path, monkeypatch):
    from extraction import backbones

    def hub_download(url, **kwargs):  # torch.hub moves a 0600 NamedTemporaryFile into its cache
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        path.parent.mkdir(parents=True)
        path.write_bytes(b"weights")
        path.chmod(0o600)
        return {"w": torch.ones(1)}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", hub_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    previous = os.umask(0o022)
    try:
        assert backbones._download_alexnet()["w"].item() == 1
    finally:
        os.umask(previous)
    assert oct((tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").stat().st_mode & 0o777) == "0o644"


# ---------------------------------------------------------------- checks before long work

@pytest.fixture
def no_scoring(monkeypatch):
    """Any scoring fails the test: the checks must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("scoring started before the outputs were checked")
    monkeypatch.setattr(evaluation, "similarity_matrix", fail)


@pytest.mark.parametrize("flag,value,message", [
    ("--plot", "curves.xyz", "curves.xyz: --plot has the unknown image extension .xyz (use one of"),
    ("--plot", "blocker/pr.png", "blocker: folder of --plot cannot be written ("),
    ("--save_sims", "blocker/sims", "blocker/sims: --save_sims folder cannot be written ("),
    ("--output", "blocker/sub/e.json", "blocker/sub: folder of --output cannot be written ("),
    ("--output", ".", ".: --output names a folder, a file name is needed"),
])
def test_evaluate_checks_outputs_before_scoring(trained, tmp_path, no_scoring, capsys, monkeypatch, flag, value,
                                               message):
    (tmp_path / "blocker").write_text("a file, not a folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        evaluate.main(["--global_ckpt", str(trained / "model_best.pth.tar"), "--device", "cpu", flag, value])
    err = one_error_line(capsys)
    assert message in err and ("blocker" not in value or "blocker is a file, not a folder)" in err)
    assert sorted(os.listdir(tmp_path)) == ["blocker"]  # nothing created


@pytest.mark.parametrize("parse,argv,message", [
    (lambda a: options.parse_options("global", a), ["--learning_rate", "0"], "--learning_rate must be greater than 0"),
    (lambda a: options.parse_options("global", a), ["--alpha_2", "-0.5"], "--alpha_2 must be at least 0"),
    (lambda a: options.parse_options("local", a), ["--beta_1", "nan"], "--beta_1 must be a finite number"),
    (lambda a: options.parse_options("local", a), ["--lambda_softmax", "0"], "--lambda_softmax must be greater"),
    (lambda a: options.parse_options("global", a), ["--gamma_2", "inf"], "--gamma_2 must be a finite number"),
    (lambda a: options.parse_options("global", a), ["--grad_clip", "-1"], "--grad_clip must be at least 0"),
    (lambda a: options.parse_options("global", a), ["--workers", "-1"], "--workers must be at least 0"),
    (lambda a: options.parse_options("global", a), ["--log_step", "0"], "--log_step must be at least 1"),
    (evaluate.parse_args, ["--global_ckpt", "g", "--chunk", "0"], "--chunk must be at least 1"),
    (evaluate.parse_args, ["--global_ckpt", "g", "--batch_size", "-2"], "--batch_size must be at least 0"),
    (vocab_cli.parse_args, ["--threshold", "0"], "--threshold must be at least 1"),
    (vocab_cli.parse_args, ["--splits", "train,"], "--splits must be split names"),
    (demo.parse_args, ["--epochs", "0"], "--epochs must be at least 1"),
    (demo.parse_args, ["--sizes", "100,0,10"], "--sizes must be three positive integers"),
    (demo.parse_args, ["--sizes", "100,10"], "--sizes must be three positive integers"),
])
def test_numeric_flags_out_of_range_are_refused(parse, argv, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse(argv)


def test_prepare_data_refuses_a_negative_seed(capsys):
    with pytest.raises(SystemExit):
        prepare_data.parse_args(["--manifest", "m.csv", "--seed", "-1"])
    assert "--seed must be 0 or more" in capsys.readouterr().err


# ---------------------------------------------------------------- mismatches that passed silently

def resume_argv(tiny_data, trained, run_dir, *extra):
    return train_argv("global", tiny_data, str(run_dir), "--num_epochs", "2",
                      "--resume", str(trained / "checkpoint.pth.tar"), *extra)


def test_resume_with_other_training_options_is_refused(tiny_data, trained, tmp_path):
    with pytest.raises(InputError) as err:
        trainer.main("global", resume_argv(tiny_data, trained, tmp_path, "--learning_rate", "0.001",
                                           "--gamma_2", "0.3"))
    message = str(err.value)
    assert "--gamma_2 0.5 in the checkpoint, 0.3 given; --learning_rate 0.0002 in the checkpoint, 0.001 given" in message
    assert "--allow_option_change" in message and not os.path.exists(tmp_path / "checkpoint.pth.tar")


def test_resume_with_allow_option_change_lists_and_continues(tiny_data, trained, tmp_path, capsys):
    trainer.main("global", resume_argv(tiny_data, trained, tmp_path, "--learning_rate", "0.001",
                                       "--allow_option_change"))
    assert ("notice: resuming with changed options: --learning_rate 0.0002 in the checkpoint, 0.001 given"
            in capsys.readouterr().out)
    saved = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    assert saved["epoch"] == 2 and saved["opt"]["learning_rate"] == 0.001
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.001


def test_run_only_options_may_change_on_resume(tiny_data, trained, tmp_path):
    trainer.main("global", resume_argv(tiny_data, trained, tmp_path, "--log_step", "3", "--workers", "0"))
    assert load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))["epoch"] == 2


def test_resume_with_another_width_names_the_tensor_and_the_flag(tiny_data, trained, tmp_path):
    with pytest.raises(InputError, match="--embed_size 16 in the checkpoint, 8 given"):
        trainer.main("global", resume_argv(tiny_data, trained, tmp_path, "--embed_size", "8"))
    with pytest.raises(InputError) as err:
        trainer.main("global", resume_argv(tiny_data, trained, tmp_path, "--embed_size", "8", "--allow_option_change"))
    assert err.match(r"checkpoint.pth.tar: tensor [\w.]+ has shape \(16, 24\) in the checkpoint, \(8, 24\) in the "
                     r"model built from the given options \(--embed_size 16 in the checkpoint, 8 given\)$")


def test_damaged_weights_name_the_whole_tensor(trained, tmp_path):
    ckpt = torch.load(trained / "model_best.pth.tar", weights_only=True)
    name = sorted(ckpt["model"])[-1]
    ckpt["model"][name] = ckpt["model"][name][..., :1].clone()
    torch.save(ckpt, tmp_path / "damaged.pth.tar")
    with pytest.raises(InputError) as err:
        model_factory.load_trained(str(tmp_path / "damaged.pth.tar"), "global", torch.device("cpu"))
    assert f"tensor {name} has shape" in str(err.value) and str(err.value).endswith(
        "in the model built from its own options (the file was edited or damaged)")


def foreign_vocabulary(known: int) -> Vocabulary:
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(known))])


def test_a_foreign_vocabulary_stops_with_the_count(tiny_data):
    with pytest.raises(InputError) as err:
        PrecompDataset(tiny_data["coarse"], tiny_data["name"], "train", foreign_vocabulary(50), "global", 24, 12)
    captions = read_captions(os.path.join(tiny_data["coarse"], tiny_data["name"], "train_caps.txt"))
    words = sum(len(vocab_cli.tokenize(c)) for c in captions)
    assert f"train_caps.txt: {words} of {words} caption words (100%) are not in the vocabulary (54 entries)" in str(err.value)


def test_unknown_word_threshold_is_half_the_words(tmp_path, tiny_data):
    folder = tmp_path / tiny_data["name"]
    shutil.copytree(os.path.join(tiny_data["coarse"], tiny_data["name"]), folder)
    lines = ["known unknown"] * 40  # exactly half unknown: accepted
    (folder / "train_caps.txt").write_text("\n".join(lines) + "\n")
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "known"])
    assert len(PrecompDataset(str(tmp_path), tiny_data["name"], "train", vocab, "global", 24, 12)) == 40
    lines[0] = "known unknown other"  # one more unknown word: over half
    (folder / "train_caps.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="41 of 81 caption words \\(51%\\)"):
        PrecompDataset(str(tmp_path), tiny_data["name"], "train", vocab, "global", 24, 12)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_bad_utf8_names_the_byte_offset_and_line(tmp_path, bom):
    path = tmp_path / "train_caps.txt"
    body = b"sky sun\n" * 2000 + b"caf\xe9 au lait\n"  # past the first read buffer
    path.write_bytes(bom + body)
    offset = len(bom) + body.index(b"\xe9")
    expected = f"train_caps.txt: not valid UTF-8 (invalid continuation byte: byte 0xe9 at byte offset {offset}, line 2001)"
    for read in (read_captions, read_utf8):
        with pytest.raises(InputError) as err:
            read(str(path))
        assert str(err.value).endswith(expected)
    path.write_bytes(bom + b"sky\n")
    assert read_captions(str(path)) == ["sky"]


def test_bad_utf8_in_a_vocabulary_manifest_or_caption_json_is_one_line(tmp_path):
    vocab_path = tmp_path / "v_vocab.json"
    vocab_path.write_bytes(b'{"word2idx": {"<pad>": 0, "caf\xe9": 1}}')
    with pytest.raises(InputError, match=r"v_vocab.json: not valid UTF-8 \(.*byte offset 30, line 1\)"):
        load_vocab(str(vocab_path))
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"image,caption,label,split\na.jpg,caf\xe9,1,train\n")
    with pytest.raises(InputError, match=r"m.csv: not valid UTF-8 \(.*byte offset 35, line 2\)"):
        read_manifest(str(manifest))
    from extraction.inputs import _load_caption_json
    caption_json = tmp_path / "dataset_x.json"
    caption_json.write_bytes(b'{"images": [{"filename": "a.png",\n "sentences": [{"raw": "caf\xe9"}]}]}')
    with pytest.raises(InputError, match=r"dataset_x.json: not valid UTF-8 \(.*byte offset 61, line 2\)"):
        _load_caption_json(caption_json)


# ---------------------------------------------------------------- rough edges

def test_loss_is_logged_once_an_epoch_when_log_step_is_larger(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    trainer.main("global", train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "2", "--log_step", "100"))
    lines = (tmp_path / "loss.log").read_text().splitlines()
    assert [line.split()[:4] for line in lines] == [["epoch", "1", "step", "4"], ["epoch", "2", "step", "4"]]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8]


def test_demo_regenerates_data_when_the_sizes_differ(tmp_path):
    args = demo.parse_args(["--data_path", str(tmp_path / "data"), "--vocab_path", str(tmp_path / "vocab"),
                            "--sizes", "30,10,10"])
    demo.prepare(args)
    assert demo.existing_sizes(args.data_path) == {"train": 30, "dev": 10, "test": 10}
    args.sizes = demo.parse_sizes("20,12,10")
    demo.prepare(args)
    assert demo.existing_sizes(args.data_path) == {"train": 20, "dev": 12, "test": 10}
    fine = tmp_path / "data" / "fine-grained-data" / demo.NAME
    assert np.load(fine / "train_cnns.npy").shape[0] == 20 and np.load(fine / "dev_labels.npy").shape[0] == 12


def authors_files(folder: Path) -> str:
    """Stand-ins for the authors' three files, with the expected caption counts."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in download.CAPTIONS.items():
        (folder / name).write_text("".join(f"word{i % 7} sky\n" for i in range(count)))
    (folder / "corel5k_precomp_vocab.json").write_text('{"word2idx": {}}')
    return str(folder)


def test_download_refuses_to_replace_other_captions_without_force(tmp_path, capsys):
    source = authors_files(tmp_path / "src")
    data, vocab_dir = tmp_path / "data", tmp_path / "vocab"
    mine = data / "fine-grained-data" / "corel5k_precomp" / "dev_caps.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("captions written by prepare_data.py\n")
    argv = ["corel5k-text", "--data_path", str(data), "--vocab_path", str(vocab_dir), "--from_dir", source]
    with pytest.raises(SystemExit):
        download.main(argv)
    assert "dev_caps.txt: already exists with other content" in one_error_line(capsys)
    assert mine.read_text() == "captions written by prepare_data.py\n" and not vocab_dir.exists()
    assert not (data / "coarse-grained-data").exists()  # nothing was written
    download.main(argv + ["--force"])
    assert mine.read_bytes() == (Path(source) / "dev_caps.txt").read_bytes()
    download.main(argv)  # the same files again: nothing to refuse


def test_run_logs_on_a_full_disk_are_one_line(disk):
    from runtime.run_log import RunLogger
    log = RunLogger(str(disk.folder))
    log.loss(0, 1, 1, {"loss": 1.0}, 2e-4)
    before = (disk.folder / "loss.log").read_text()
    disk.fill()
    if not disk.real:
        log.losses = NoSpaceFile(log.losses)
    with pytest.raises(OutputError, match=f"loss.log: cannot be written \\({ENOSPC}\\); the checkpoints"):
        log.loss(0, 2, 2, {"a_long_term_name" * 1000: 0.5}, 2e-4)  # longer than the free end of the last page
    assert (disk.folder / "loss.log").read_text().startswith(before)


def test_demo_checks_its_folders_before_generating(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(SystemExit):
        demo.main(["--data_path", str(tmp_path / "data"), "--vocab_path", str(tmp_path / "vocab"),
                   "--run_dir", str(tmp_path / "blocker" / "runs")])
    assert "blocker/runs: --run_dir folder cannot be written" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["blocker"]
