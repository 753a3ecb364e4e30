"""reproduce.py end to end on tiny generated data, its resumption and its table arithmetic."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import evaluate
import reproduce
import trainer
from options import parse_options
from tests.conftest import TINY_MODEL_FLAGS, make_dataset

SEEDS = (1, 2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads wait on each other (tiny GRUs 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reproduce_argv(tiny_data: dict, root: str, *extra: str) -> list[str]:
    model_flags = [f for f in TINY_MODEL_FLAGS if f not in ("--device", "cpu")]
    return ["--global_data_path", tiny_data["coarse"], "--local_data_path", tiny_data["fine"],
            "--data_name", tiny_data["name"], "--vocab_path", tiny_data["vocab"], "--epochs", "1",
            "--seeds", ",".join(map(str, SEEDS)), "--device", "cpu", "--results_dir", f"{root}/results",
            "--runs_dir", f"{root}/runs", *model_flags, *extra]


@pytest.fixture
def calls(monkeypatch) -> dict[str, list]:
    """Record every training and evaluation reproduce.py starts."""
    seen = {"train": [], "evaluate": []}
    train_main, evaluate_run = trainer.main, evaluate.run

    def counted_train(kind, argv):
        seen["train"].append((kind, argv))
        return train_main(kind, argv)

    def counted_evaluate(config):
        seen["evaluate"].append(config)
        return evaluate_run(config)
    monkeypatch.setattr(trainer, "main", counted_train)
    monkeypatch.setattr(evaluate, "run", counted_evaluate)
    return seen


@pytest.fixture(scope="module")
def reproduced(tiny_data, tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("reproduce"))
    table = reproduce.main(reproduce_argv(tiny_data, root, "--alpha_1", "0.5", "--beta_2=0.3"))
    return root, table


def expected_rows(protocol: str) -> list[str]:
    return [reproduce.row_name(row, suffix) for _, _, protocols, suffix in reproduce.GROUPS.values()
            if protocol in protocols for row in reproduce.SUBNETWORK_ROWS]


def test_writes_table_with_every_row(reproduced, tiny_data) -> None:
    root, tables = reproduced
    table = tables["label"]
    folder = os.path.join(root, "results", tiny_data["name"])
    on_disk = json.load(open(os.path.join(folder, "table.json"), encoding="utf-8"))
    assert list(on_disk["rows"]) == expected_rows("label")
    assert "global, triplet loss" in on_disk["rows"] and "fused, no auxiliary terms" in on_disk["rows"]
    assert on_disk["seeds"] == list(SEEDS) and on_disk["epochs"] == 1 and on_disk["split"] == "test"
    assert on_disk["images"] == 20 and on_disk["captions_per_image"] == 1
    row = on_disk["rows"]["fused (w tuned on dev)"]
    assert len(row["i2t mAP"]["values"]) == len(SEEDS) and 0 < row["i2t mAP"]["mean"] <= 100
    assert row["mean mAP"]["mean"] == pytest.approx((row["i2t mAP"]["mean"] + row["t2i mAP"]["mean"]) / 2)
    assert on_disk["rows"]["global, untrained"]["dev_rising_at_last_epoch"] == "-"
    assert on_disk["rows"]["global"]["dev_rising_at_last_epoch"] in ("0/2", "1/2", "2/2")
    # one epoch each: the best epoch is 1 and no run stopped early
    assert on_disk["rows"]["fused, triplet loss"]["mean_best_epoch"] == "1.0"
    assert on_disk["rows"]["fused, triplet loss"]["stopped_early"] == "0/4"
    assert on_disk["rows"]["local, untrained"]["mean_best_epoch"] == "-"
    stages = on_disk["wall_time_s"]
    trainings, evaluations = 5 * 2, 4 + 6  # 5 variants x 2 subnetworks; 4 label and 6 instance groups
    assert len(stages) == len(SEEDS) * (trainings + evaluations) and all(s >= 0 for s in stages.values())
    markdown = open(os.path.join(folder, "table.md"), encoding="utf-8").read()
    for label in expected_rows("label"):
        assert f"| {label} | " in markdown
    assert " ± " in markdown and table["rows"] == on_disk["rows"]
    assert os.path.getsize(os.path.join(folder, "dev_curves.png")) > 0


def test_writes_the_instance_table_with_the_instance_trained_rows(reproduced, tiny_data) -> None:
    root, tables = reproduced
    folder = os.path.join(root, "results", tiny_data["name"])
    on_disk = json.load(open(os.path.join(folder, "table_instance.json"), encoding="utf-8"))
    assert on_disk["rows"] == tables["instance"]["rows"] and on_disk["protocol"] == "instance"
    assert list(on_disk["rows"]) == expected_rows("instance")
    row = on_disk["rows"]["fused, instance-trained, triplet loss"]
    recalls = [row[f"{d} R@{k}"]["mean"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert row["mR"]["mean"] == pytest.approx(sum(recalls) / 6)
    # the same checkpoints as the label table, scored instance-wise
    seed1 = json.load(open(os.path.join(folder, "seed1", "instance", "trained.json"), encoding="utf-8"))
    assert seed1["relevance"] == "instance" and seed1["rows"]["global"]["mR"] == row_value(on_disk, "global", 0)
    assert on_disk["duplicate_captions"]["distinct_strings"] > 0 and on_disk["published"] == []
    markdown = open(os.path.join(folder, "table_instance.md"), encoding="utf-8").read()
    assert "instance-level" in markdown and "| mR |" in markdown


def row_value(table: dict, row: str, seed_index: int) -> float:
    return table["rows"][row]["mR"]["values"][seed_index]


def test_published_rows_are_marked_beside_the_instance_table() -> None:
    table = {"duplicate_captions": {"captions_with_a_twin_of_another_image": 12, "distinct_strings": 30},
             "published": reproduce.published_rows("rsicd_precomp")}
    lines = "\n".join(reproduce.published_markdown(table))
    assert "| GaLR (ResNet-18, GRU), published | 6.59 | 19.85 | 31.04 | 4.69 | 19.48 | 32.13 | 18.96 |" in lines
    assert "12 test captions have an identical twin" in lines
    ucm = "\n".join(reproduce.published_markdown({"published": reproduce.published_rows("ucm_precomp")}))
    assert "| SCAN (ResNet-101), published | - | - | - | - | - | - | 43.43 |" in ucm


def test_runs_use_seeds_variants_and_routed_flags(reproduced, tiny_data) -> None:
    root, _ = reproduced
    runs = os.path.join(root, "runs", tiny_data["name"])
    opts = {(variant, kind): torch.load(os.path.join(runs, variant, kind, "seed2", trainer.BEST),
                                        weights_only=True)["opt"]
            for variant in reproduce.VARIANTS for kind in reproduce.AUX_WEIGHTS}
    assert {(o["loss"], o["relevance"]) for (v, _), o in opts.items() if v == "instance_triplet"} == \
        {("triplet", "instance")}
    assert {(o["loss"], o["relevance"]) for (v, _), o in opts.items() if v == "triplet"} == {("triplet", "label")}
    assert {(o["loss"], o["relevance"]) for (v, _), o in opts.items() if v == "full"} == {("msb", "label")}
    assert all(o["seed"] == 2 and o["num_epochs"] == 1 and o["embed_size"] == 16 for o in opts.values())
    assert (opts["full", "global"]["alpha_1"], opts["full", "global"]["alpha_2"]) == (0.5, 0.8)
    assert (opts["full", "local"]["beta_1"], opts["full", "local"]["beta_2"]) == (0.4, 0.3)
    assert (opts["noaux", "global"]["alpha_1"], opts["noaux", "global"]["alpha_2"]) == (0, 0)
    assert (opts["noaux", "local"]["beta_1"], opts["noaux", "local"]["beta_2"]) == (0, 0)


def test_rerun_trains_and_evaluates_nothing(reproduced, tiny_data, calls) -> None:
    root, table = reproduced
    again = reproduce.main(reproduce_argv(tiny_data, root, "--alpha_1", "0.5", "--beta_2=0.3"))
    assert calls == {"train": [], "evaluate": []}
    for protocol in ("label", "instance"):
        assert again[protocol]["rows"] == table[protocol]["rows"]
        assert again[protocol]["wall_time_s"] == table[protocol]["wall_time_s"]


def test_rerun_resumes_an_unfinished_run_and_reevaluates_it(tiny_data, tmp_path, calls) -> None:
    argv = reproduce_argv(tiny_data, str(tmp_path), "--seeds", "1")
    reproduce.main(argv)
    folder = os.path.join(tmp_path, "runs", tiny_data["name"], "full", "local", "seed1")
    last = os.path.join(folder, trainer.LAST)
    state = torch.load(last, weights_only=True)
    state["evaluated"] = False  # as if interrupted between the last batch and the dev evaluation
    torch.save(state, last)
    best = open(os.path.join(folder, trainer.BEST), "rb").read()
    os.utime(os.path.join(folder, trainer.BEST))  # newer than the evaluations, but the same bytes
    calls["train"].clear(), calls["evaluate"].clear()
    reproduce.main(argv)
    assert [kind for kind, _ in calls["train"]] == ["local"] and "--resume" in calls["train"][0][1]
    assert torch.load(last, weights_only=True)["evaluated"]
    if open(os.path.join(folder, trainer.BEST), "rb").read() == best:  # the evaluations read the same files
        assert calls["evaluate"] == []
    else:  # the resumed evaluation found a better epoch: the evaluations reading model_best run again
        outputs = [config.output for config in calls["evaluate"]]
        assert [os.path.relpath(o, os.path.join(tmp_path, "results", tiny_data["name"], "seed1")) for o in outputs] \
            == ["trained.json", os.path.join("instance", "trained.json")]


def test_rerun_after_the_features_were_replaced_trains_and_evaluates_again(tmp_path, calls, capsys) -> None:
    data = make_dataset(str(tmp_path / "data"), "tiny_precomp", {"train": 40, "dev": 20, "test": 20}, seed=3)
    argv = reproduce_argv(data, str(tmp_path), "--seeds", "1", "--rows", "untrained,trained,noaux")
    first = reproduce.main(argv)
    features = os.path.join(data["coarse"], data["name"], "train_cnns.npy")
    np.save(features, np.load(features)[::-1].copy())  # same name, shape and widths: other values
    calls["train"].clear(), calls["evaluate"].clear()
    again = reproduce.main(argv)
    assert sorted(kind for kind, _ in calls["train"]) == ["global", "global"]  # full and no auxiliary terms
    assert all("--overwrite" in argv for _, argv in calls["train"])
    # 3 row groups under 2 protocols, all reading a global checkpoint trained again
    assert len(calls["evaluate"]) == 6 and "the data changed since" in capsys.readouterr().out
    assert again["label"]["rows"]["global"] != first["label"]["rows"]["global"]


def test_changed_settings_are_refused(reproduced, tiny_data, capsys) -> None:
    root, _ = reproduced
    with pytest.raises(SystemExit):
        reproduce.main(reproduce_argv(tiny_data, root, "--alpha_1", "0.5", "--beta_2=0.3", "--embed_size", "8"))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--embed_size 16 in the checkpoint, 8 given" in err and "--runs_dir" in err


@pytest.mark.parametrize("flag", ["--seed", "--num_epochs=3", "--resume"])
def test_flags_reproduce_sets_are_refused(tiny_data, tmp_path, flag) -> None:
    with pytest.raises(SystemExit):
        reproduce.main(reproduce_argv(tiny_data, str(tmp_path), flag, "1"))
    assert not os.path.exists(tmp_path / "runs")


def test_untrained_checkpoint_is_the_trainers_initial_model(tiny_data, tmp_path) -> None:
    argv = ["--data_path", tiny_data["fine"], "--data_name", tiny_data["name"], "--vocab_path", tiny_data["vocab"],
            "--logger_name", str(tmp_path), "--model_name", str(tmp_path), "--seed", "7", *TINY_MODEL_FLAGS]
    opt = parse_options("local", argv)
    reproduce.save_untrained("local", opt, str(tmp_path / "untrained.pth.tar"))
    saved = torch.load(tmp_path / "untrained.pth.tar", weights_only=True)
    fresh = trainer.Trainer("local", opt)
    initial = fresh.model.state_dict()
    fresh.release()
    assert saved["epoch"] == 0 and saved["model"].keys() == initial.keys()
    assert all(torch.equal(saved["model"][k], initial[k]) for k in initial)


def test_rows_selects_a_subset_and_early_stop_reaches_the_trainings(tiny_data, tmp_path, calls) -> None:
    tables = reproduce.main(reproduce_argv(tiny_data, str(tmp_path), "--seeds", "1", "--rows", "triplet",
                                           "--early_stop", "3"))
    assert sorted({argv[argv.index("--model_name") + 1].split(os.sep)[-3] for _, argv in calls["train"]}) == \
        ["triplet"]
    assert all(argv[argv.index("--early_stop") + 1] == "3" for _, argv in calls["train"])
    assert list(tables["label"]["rows"]) == ["global, triplet loss", "local, triplet loss", "fused, triplet loss"]
    assert list(tables["instance"]["rows"]) == list(tables["label"]["rows"]) and tables["label"]["early_stop"] == 3


@pytest.mark.parametrize("flag", ["--rows=trained,nonsense", "--loss=triplet", "--relevance=instance"])
def test_row_groups_and_per_row_flags_are_checked(tiny_data, tmp_path, flag) -> None:
    with pytest.raises(SystemExit):
        reproduce.main(reproduce_argv(tiny_data, str(tmp_path), flag))


def test_an_early_stopped_run_is_finished(tiny_data, tmp_path) -> None:
    opt = parse_options("global", ["--num_epochs", "10", "--early_stop", "2"])
    state = {"kind": "global", "model": {}, "opt": opt, "vocab": {}, "epoch": 3, "best_epoch": 1,
             "stop_reason": "early_stop"}
    torch.save(state, tmp_path / trainer.LAST)
    assert reproduce.finished(str(tmp_path / trainer.LAST), opt)
    assert not reproduce.finished(str(tmp_path / trainer.LAST), {**opt, "early_stop": 3})  # more patience: resume
    assert reproduce.run_stop(str(tmp_path)) == (1, True)


def test_flags_for_routes_aux_weights() -> None:
    passthrough = ["--alpha_1", "0.5", "--beta_1=0.2", "--embed_size", "8", "--beta_2", "0.1", "--alpha_2=0"]
    assert reproduce.flags_for("global", passthrough) == ["--alpha_1", "0.5", "--embed_size", "8", "--alpha_2=0"]
    assert reproduce.flags_for("local", passthrough) == ["--beta_1=0.2", "--embed_size", "8", "--beta_2", "0.1"]


def test_feature_dims_come_from_summary(tmp_path) -> None:
    folder = tmp_path / "coarse" / "x_precomp"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"dims": {"cnn": 1280, "bovw": 500}}))
    args, _ = reproduce.parse_args(["--global_data_path", str(tmp_path / "coarse"), "--data_name", "x_precomp"])
    assert reproduce.feature_dims(args) == ["--cnn_dim", "1280", "--bovw_dim", "500"]
    args.cnn_dim = 4096  # a given flag wins
    assert reproduce.feature_dims(args) == ["--cnn_dim", "4096", "--bovw_dim", "500"]


def test_mean_std_matches_plain_formula() -> None:
    values = [31.25, 40.5, 28.0, 35.125]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    result = reproduce.mean_std(values)
    assert abs(result["mean"] - mean) < 1e-6 and abs(result["std"] - std) < 1e-6
    assert reproduce.mean_std([12.0]) == {"mean": 12.0, "std": 0.0, "values": [12.0]}


def test_dev_curve_and_still_rising(tmp_path) -> None:
    (tmp_path / "performance.log").write_text(
        "epoch 0 i2t_mAP 1.0 t2i_mAP 1.0 rsum 2.0\n"
        "epoch 1 i2t_mAP 5.0 t2i_mAP 5.0 rsum 10.0\n"
        "epoch 2 i2t_mAP 4.0 t2i_mAP 4.0 rsum 8.0\n"
        "epoch 2 i2t_mAP 6.0 t2i_mAP 6.0 rsum 12.0\n")  # epoch 2 evaluated again after a resume
    curve = reproduce.dev_curve(str(tmp_path))
    assert curve == {0: 2.0, 1: 10.0, 2: 12.0} and reproduce.still_rising(curve)
    assert not reproduce.still_rising({0: 2.0, 1: 10.0, 2: 9.0})


def test_timings_of_parallel_seed_processes_are_all_kept(tmp_path):
    path = str(tmp_path / "timings.json")
    first, second = reproduce.Timings(path), reproduce.Timings(path)  # two processes, opened before either wrote
    first.record("seed1/train/full/global", 10.0)
    second.record("seed2/train/full/global", 20.0)
    assert reproduce.Timings(path).seconds == {"seed1/train/full/global": 10.0, "seed2/train/full/global": 20.0}


def test_ablation_rows_run_with_their_own_seeds(tiny_data, tmp_path, calls) -> None:
    tables = reproduce.main(reproduce_argv(tiny_data, str(tmp_path), "--seeds", "1,2", "--ablation_seeds", "2",
                                           "--rows", "trained,noaux"))
    trained = sorted((argv[argv.index("--model_name") + 1].split(os.sep)[-3], argv[argv.index("--seed") + 1])
                     for _, argv in calls["train"])
    assert trained == [("full", "1"), ("full", "1"), ("full", "2"), ("full", "2"), ("noaux", "2"), ("noaux", "2")]
    label = tables["label"]
    assert label["rows"]["global"]["seeds"] == [1, 2] and label["rows"]["fused, no auxiliary terms"]["seeds"] == [2]
    assert len(label["rows"]["local, no auxiliary terms"]["t2i mAP"]["values"]) == 1
    assert label["fusion_weights"]["noaux"].keys() == {2} and label["fusion_weights"]["trained"].keys() == {1, 2}
    markdown = open(os.path.join(tmp_path, "results", tiny_data["name"], "table.md"), encoding="utf-8").read()
    assert "3 ablation rows ran with seeds 2 only (--ablation_seeds)" in markdown
    noaux_line = next(line for line in markdown.splitlines() if line.startswith("| global, no auxiliary terms |"))
    global_line = next(line for line in markdown.splitlines() if line.startswith("| global |"))
    assert "±" not in noaux_line and noaux_line.endswith("| 2 |")
    assert "±" in global_line and global_line.endswith("| 1, 2 |")


def test_ablation_seeds_are_checked(tiny_data, tmp_path) -> None:
    with pytest.raises(SystemExit):
        reproduce.main(reproduce_argv(tiny_data, str(tmp_path), "--ablation_seeds", "one"))
