"""dev_curves.py: per-epoch dev mAP of both protocols from performance.log files, drawn as one PNG."""
from __future__ import annotations

import os

import pytest

import dev_curves
import trainer
from runtime.errors import InputError
from runtime.run_log import PERFORMANCE_LOG, RunLogger, read_performance
from tests.conftest import train_argv

NEW = ("epoch 0 i2t_mAP 10.0 t2i_mAP 20.0 instance_i2t_mAP 1.0 instance_t2i_mAP 3.0 instance_mR 2.0 rsum 30.0\n"
       "epoch 1 i2t_mAP 30.0 t2i_mAP 40.0 instance_i2t_mAP 5.0 instance_t2i_mAP 7.0 instance_mR 4.0 rsum 70.0\n")
OLD = "epoch 0 i2t_mAP 12.0 t2i_mAP 22.0 rsum 34.0\nepoch 1 i2t_mAP 32.0 t2i_mAP 42.0 rsum 74.0\n"


def write_runs(root) -> None:
    for variant, seed, text in (("full", 1, NEW), ("full", 2, NEW.replace("30.0 t2i", "50.0 t2i")),
                                ("noaux", 1, OLD)):
        folder = root / variant / "global" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "performance.log").write_text(text)


def test_curves_of_both_protocols_are_read_and_averaged(tmp_path):
    write_runs(tmp_path)
    assert dev_curves.read_curves(str(tmp_path / "full/global/seed1/performance.log")) == {
        "label": {0: 15.0, 1: 35.0}, "instance": {0: 2.0, 1: 6.0}}
    assert dev_curves.read_curves(str(tmp_path / "noaux/global/seed1/performance.log"))["instance"] == {}
    runs = dev_curves.runs_of(str(tmp_path))
    assert {name: len(logs) for name, logs in runs.items()} == {"full global": 2, "noaux global": 1}
    curves = [dev_curves.read_curves(log)["label"] for log in runs["full global"]]
    assert dev_curves.mean_curve(curves) == ([0, 1], [15.0, 40.0])


def test_cli_writes_one_png(tmp_path, capsys):
    write_runs(tmp_path / "runs")
    out = dev_curves.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "curves.png")])
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        dev_curves.main(["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")])
    assert "no <variant>/<kind>/seed<s>/performance.log found" in capsys.readouterr().err


def test_png_from_a_tiny_training_run(tiny_data, tmp_path):
    run_dir = tmp_path / "runs" / "full" / "global" / "seed1"
    trainer.main("global", train_argv("global", tiny_data, str(run_dir), "--num_epochs", "2"))
    curves = dev_curves.read_curves(str(run_dir / "performance.log"))
    assert sorted(curves["label"]) == sorted(curves["instance"]) == [0, 1, 2]
    out = dev_curves.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "curves.png")])
    assert os.path.getsize(out) > 1000


def test_run_log_reads_back_what_it_writes(tmp_path):
    """run_log owns performance.log: its RunLogger's lines read back by read_performance, old lines too."""
    logger = RunLogger(str(tmp_path))
    metrics = {"mAP": 31.25, "R@1": 1.0}
    logger.metrics(2, {"i2t": metrics, "t2i": {**metrics, "mAP": 40.5}, "rsum": 71.75, "selection": 71.75,
                       "instance": {"i2t": metrics, "t2i": metrics, "mR": 4.5, "rsum": 62.5}})
    logger.close()
    log = tmp_path / PERFORMANCE_LOG
    with open(log, "a", encoding="utf-8") as f:
        f.write("\n" + OLD)  # a blank line, then lines without the instance-level fields
    assert read_performance(str(log)) == [
        {"epoch": 2, "i2t_mAP": 31.25, "t2i_mAP": 40.5, "instance_i2t_mAP": 31.25, "instance_t2i_mAP": 31.25,
         "instance_mR": 4.5, "rsum": 71.75},
        {"epoch": 0, "i2t_mAP": 12.0, "t2i_mAP": 22.0, "rsum": 34.0},
        {"epoch": 1, "i2t_mAP": 32.0, "t2i_mAP": 42.0, "rsum": 74.0}]
    log.write_text(OLD + "epoch 2 i2t_mAP nan? rsum\n")
    with pytest.raises(InputError, match=r"performance.log: line 3 is not an evaluation line"):
        read_performance(str(log))
