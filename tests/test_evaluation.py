"""evaluation.py: the typed configuration of the shared flags, open_split, and evaluate.run called from Python."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import evaluate
import search
import visualize
from evaluation import FUSION_GRID, SubnetworkConfig, open_split
from metrics import retrieval_metrics


@pytest.mark.parametrize("parse,argv,config", [
    (evaluate.parse_args, ["--global_ckpt", "g"], evaluate.EvaluationConfig(global_ckpt="g")),
    (search.parse_args, ["--global_ckpt", "g", "--text", "sky"], search.SearchConfig(global_ckpt="g", text="sky")),
    (visualize.parse_args, ["--local_ckpt", "l"], visualize.FigureConfig(local_ckpt="l")),
])
def test_each_command_parses_into_its_configuration_with_the_same_defaults(parse, argv, config):
    assert parse(argv) == config


def both(untrained: dict, tiny_data: dict, **fields) -> SubnetworkConfig:
    return SubnetworkConfig(global_ckpt=untrained["global"], local_ckpt=untrained["local"], device="cpu",
                            global_data_path=tiny_data["coarse"], local_data_path=tiny_data["fine"], **fields)


def test_open_split_takes_the_given_weight_or_the_best_on_dev(untrained, tiny_data):
    given = open_split(both(untrained, tiny_data, fusion_weight=0.3))
    assert [net.kind for net in given.nets] == ["global", "local"] and given.split == "test" and given.weight == 0.3
    assert all(net.batch_size == net.opt["batch_size"] for net in given.nets)  # 0: the checkpoint's
    tuned = open_split(both(untrained, tiny_data, batch_size=7), tune_fusion=True)
    assert [net.batch_size for net in tuned.nets] == [7, 7]
    g, l = (net.sims("dev") for net in tuned.nets)
    dev = tuned.nets[0].dataset("dev")
    rsums = [retrieval_metrics(w * g + (1 - w) * l, dev.labels.numpy(), dev.caption_labels.numpy())["rsum"]
             for w in FUSION_GRID]
    assert tuned.weight == FUSION_GRID[int(np.argmax(rsums))]
    alone = open_split(SubnetworkConfig(global_ckpt=untrained["global"], data_path=tiny_data["coarse"], device="cpu"))
    assert len(alone.nets) == 1 and alone.weight is None


def test_open_split_falls_back_to_dev_without_a_test_split(untrained, tiny_data, tmp_path, capsys):
    shutil.copytree(f"{tiny_data['coarse']}/{tiny_data['name']}", tmp_path / tiny_data["name"],
                    ignore=shutil.ignore_patterns("test_*"))
    opened = open_split(SubnetworkConfig(global_ckpt=untrained["global"], data_path=str(tmp_path), device="cpu"))
    assert opened.split == "dev" and "no test split" in capsys.readouterr().out


def test_evaluate_run_with_a_configuration_equals_the_command_line(untrained, tiny_data, tmp_path):
    argv = ["--global_ckpt", untrained["global"], "--local_ckpt", untrained["local"], "--global_data_path",
            tiny_data["coarse"], "--local_data_path", tiny_data["fine"], "--device", "cpu", "--tune_fusion",
            "--output", str(tmp_path / "e.json")]
    config = evaluate.EvaluationConfig(global_ckpt=untrained["global"], local_ckpt=untrained["local"], device="cpu",
                                       global_data_path=tiny_data["coarse"], local_data_path=tiny_data["fine"],
                                       tune_fusion=True, output=str(tmp_path / "e.json"))
    assert evaluate.parse_args(argv) == config
    assert evaluate.run(config) == evaluate.main(argv)
