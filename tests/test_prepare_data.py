"""Feature preparation from raw images (prepare_data.py, extraction/) on small generated data.

Only one full run uses the (randomly initialised) AlexNet, which is slow on a CPU; the other end-to-end
runs swap in a cheap stand-in for fc7, since what they check (inputs, caching, BoVW, codebook, errors)
does not depend on it.
"""
from __future__ import annotations

import json
import shutil
import struct
import urllib.error
from functools import partial
from pathlib import Path

import numpy as np
import py7zr
import pytest
import torch
from scipy.io import savemat

from extraction import features
import prepare_data
from extraction.inputs import label_mapping, read_corel, read_manifest

from tests._images import draw_image, make_collection, write_manifest
from tests.conftest import run_script

NAME = "toy_precomp"
SMALL = ["--cnn_weights", "random", "--codebook_size", "8", "--sift_step", "4", "--sift_size", "8",
         "--chunk_size", "2", "--batch_size", "2", "--device", "cpu", "--seed", "3"]
SPLIT_SIZES = {"train": 8, "dev": 3, "test": 3}

# torchvision.models.alexnet().state_dict() keys, written out because torchvision is not a dependency
TORCHVISION_ALEXNET_KEYS = [
    "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
    "features.6.weight", "features.6.bias", "features.8.weight", "features.8.bias",
    "features.10.weight", "features.10.bias", "classifier.1.weight", "classifier.1.bias",
    "classifier.4.weight", "classifier.4.bias", "classifier.6.weight", "classifier.6.bias",
]


def run(manifest: Path, out: Path, *extra: str, source: str = "--manifest") -> None:
    prepare_data.main([source, str(manifest), "--out_path", str(out), "--data_name", NAME, *SMALL, *extra])


def folder(out: Path, granularity: str = "coarse") -> Path:
    return out / f"{granularity}-grained-data" / NAME


def output_files(out: Path) -> dict[str, bytes]:
    """Every output file of both granularities, by relative path, as bytes."""
    files = sorted(p for g in ("coarse", "fine") for p in folder(out, g).iterdir())
    return {str(p.relative_to(out)): p.read_bytes() for p in files if p.name != "summary.json"}


def fake_fc7(model, batch: np.ndarray, device) -> np.ndarray:
    """Cheap stand-in for AlexNet fc7: per-view channel means, tiled to 4096 values."""
    return np.tile(batch.mean(axis=(2, 3)), (1, features.CNN_DIM // 3 + 1))[:, :features.CNN_DIM]


@pytest.fixture
def cheap_cnn(monkeypatch):
    monkeypatch.setattr(features, "fc7_features", fake_fc7)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A generated collection and one full run with the real (random-weight) AlexNet."""
    base = tmp_path_factory.mktemp("toy")
    manifest = write_manifest(base / "images" / "manifest.csv", make_collection(base / "images", SPLIT_SIZES))
    run(manifest, base / "out")
    return {"manifest": manifest, "out": base / "out"}


# ---------------------------------------------------------------- AlexNet

def test_alexnet_module_names_match_torchvision(tmp_path):
    assert list(features.AlexNet().state_dict()) == TORCHVISION_ALEXNET_KEYS
    reference = features.AlexNet()
    state = {k: torch.full_like(v, i) for i, (k, v) in enumerate(reference.state_dict().items())}
    torch.save(state, tmp_path / "alexnet.pth")
    model = features.build_alexnet(str(tmp_path / "alexnet.pth"))
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_fc7_is_second_linear_after_relu():
    model = features.build_alexnet("random", seed=1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled = torch.flatten(model.avgpool(model.features(x)), 1)
        expected = torch.relu(model.classifier[4](torch.relu(model.classifier[1](pooled))))
        assert torch.allclose(model.fc7(x), expected)
    assert torch.equal(features.build_alexnet("random", seed=1).features[0].weight, model.features[0].weight)


def test_offline_imagenet_download_says_to_pass_a_file(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    manifest = write_manifest(tmp_path / "m.csv", make_collection(tmp_path, {"train": 3}))
    with pytest.raises(SystemExit):
        prepare_data.main(["--manifest", str(manifest), "--out_path", str(tmp_path / "out"),
                           "--codebook_size", "8", "--cnn_weights", "imagenet"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--cnn_weights" in err and "alexnet-owt-7be5be79.pth" in err and "Traceback" not in err


def test_weight_file_that_is_not_alexnet_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torchvision AlexNet weights"):
        features.build_alexnet(str(tmp_path / "other.pth"))


# ---------------------------------------------------------------- grid and BoVW

def test_grid_boxes_use_floor_boundaries_row_major():
    boxes = features.grid_boxes(10, 7)
    assert boxes[0] == (0, 0, 3, 2) and boxes[1] == (3, 0, 6, 2) and boxes[8] == (6, 4, 10, 7)
    points = np.array([[0, 0], [2.9, 1.9], [3, 0], [9.9, 6.9], [5, 4]], dtype=np.float32)
    assert features.block_of_points(points, 10, 7).tolist() == [0, 0, 1, 8, 7]


def test_histograms_sum_to_one_and_empty_blocks_are_zero_not_nan():
    image = draw_image("circles", 0, size=(64, 64))
    codebook = np.random.default_rng(0).random((5, features.SIFT_DIM)).astype(np.float32) * 50
    dense = features.image_bovw(image, codebook, step=4, size=8)
    assert dense.shape == (10, 5) and np.allclose(dense.sum(axis=1), 1.0)
    sparse = features.image_bovw(image, codebook, step=40, size=8)  # keypoints at x, y = 20 and 60 only
    assert np.isfinite(sparse).all()
    assert np.allclose(sparse.sum(axis=1), [1, 1, 0, 1, 0, 0, 0, 1, 0, 1])


def test_nearest_centre_assignment():
    codebook = np.array([[0.0] * 128, [10.0] * 128], dtype=np.float32)
    descriptors = np.array([[1.0] * 128, [9.0] * 128, [4.0] * 128], dtype=np.float32)
    assert features.assign_words(descriptors, codebook).tolist() == [0, 1, 0]


def test_label_mapping_sorted_numeric_when_all_integers():
    assert label_mapping(["10", "9", "100", "9"]) == {"9": 0, "10": 1, "100": 2}
    assert label_mapping(["dog", "cat"]) == {"cat": 0, "dog": 1}


# ---------------------------------------------------------------- full runs on a manifest

def test_output_files_shapes_dtypes_and_summary(toy):
    for split, n in SPLIT_SIZES.items():
        for granularity, block_shape in (("coarse", ()), ("fine", (9,))):
            d = folder(toy["out"], granularity)
            cnns, bovws = np.load(d / f"{split}_cnns.npy"), np.load(d / f"{split}_bovws.npy")
            assert cnns.shape == (n, *block_shape, 4096) and cnns.dtype == np.float32
            assert bovws.shape == (n, *block_shape, 8) and bovws.dtype == np.float32
            assert np.allclose(bovws.sum(axis=-1), 1.0)
            labels = np.load(d / f"{split}_labels.npy")
            assert labels.shape == (n,) and labels.dtype == np.int64
            assert len((d / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()) == n
    summary = json.loads((folder(toy["out"]) / "summary.json").read_text())
    assert summary["label_mapping"] == {"circles": 0, "squares": 1, "stripes": 2}
    assert summary["cnn"]["weights"] == "random"
    assert {s: v["items"] for s, v in summary["splits"].items()} == SPLIT_SIZES
    assert np.load(folder(toy["out"]) / "codebook.npy").shape == (8, 128)
    assert not (toy["out"] / ".cache").exists()
    coarse = np.load(folder(toy["out"], "coarse") / "train_cnns.npy")
    assert np.abs(coarse).sum(axis=1).min() > 0


def test_block_feature_equals_block_extracted_alone(toy):
    fine = np.load(folder(toy["out"], "fine") / "dev_cnns.npy")
    rows = [r for r in (toy["manifest"].read_text().splitlines()[1:]) if r.endswith(",dev")]
    image = features.load_rgb(toy["manifest"].parent / rows[1].split(",")[0])
    model = features.build_alexnet("random", seed=3)
    for block in (0, 4, 8):
        alone = image.crop(features.grid_boxes(*image.size)[block])
        vector = features.fc7_features(model, features.cnn_tensor(alone)[None], torch.device("cpu"))[0]
        np.testing.assert_allclose(fine[1, block], vector, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def cheap(tmp_path_factory) -> dict:
    """A collection listed in a TSV manifest and one run with the stand-in fc7."""
    base = tmp_path_factory.mktemp("cheap")
    rows = make_collection(base / "images", SPLIT_SIZES, seed=1)
    manifest = write_manifest(base / "images" / "m.tsv", rows, delimiter="\t")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "fc7_features", fake_fc7)
        run(manifest, base / "out")
    return {"manifest": manifest, "out": base / "out", "rows": rows}


def copy_images(cheap: dict, tmp_path: Path) -> Path:
    """A private copy of the cheap collection's folder; returns its manifest."""
    shutil.copytree(cheap["manifest"].parent, tmp_path / "images")
    return tmp_path / "images" / cheap["manifest"].name


def test_same_seed_same_output(cheap, cheap_cnn, tmp_path):
    run(cheap["manifest"], tmp_path / "again")
    assert output_files(tmp_path / "again") == output_files(cheap["out"])


def test_interrupted_run_resumes_without_recomputing(cheap, tmp_path, monkeypatch):
    calls = {"cnn": 0, "sift": 0}
    real_sift = features.dense_sift

    def counting_fc7(model, batch, device, stop_after=None):
        if stop_after is not None and calls["cnn"] >= stop_after:
            raise KeyboardInterrupt
        calls["cnn"] += len(batch) // features.N_VIEWS
        return fake_fc7(model, batch, device)

    def counting_sift(*args, **kwargs):
        calls["sift"] += 1
        return real_sift(*args, **kwargs)

    monkeypatch.setattr(features, "fc7_features", partial(counting_fc7, stop_after=4))
    with pytest.raises(KeyboardInterrupt):
        run(cheap["manifest"], tmp_path / "out")
    assert list((tmp_path / "out" / ".cache").rglob("part-*.npz")) and not folder(tmp_path / "out").exists()

    calls["cnn"] = 0
    monkeypatch.setattr(features, "fc7_features", counting_fc7)
    monkeypatch.setattr(features, "dense_sift", counting_sift)
    run(cheap["manifest"], tmp_path / "out")
    assert calls == {"cnn": sum(SPLIT_SIZES.values()) - 4, "sift": 0}  # BoVW had finished before the stop
    assert output_files(tmp_path / "out") == output_files(cheap["out"])


def test_codebook_is_seeded():
    descriptors = np.random.default_rng(0).random((300, features.SIFT_DIM)).astype(np.float32)
    first = features.fit_codebook(descriptors, 6, seed=0)
    assert first.shape == (6, 128) and first.dtype == np.float32
    assert np.array_equal(first, features.fit_codebook(descriptors, 6, seed=0))
    assert not np.array_equal(first, features.fit_codebook(descriptors, 6, seed=1))


def test_codebook_depends_only_on_training_images(cheap, cheap_cnn, tmp_path):
    manifest = copy_images(cheap, tmp_path)
    dev_image = manifest.parent / next(r["image"] for r in cheap["rows"] if r["split"] == "dev")
    draw_image("stripes", 999).save(dev_image)
    run(manifest, tmp_path / "out")
    before, after = folder(cheap["out"]), folder(tmp_path / "out")
    assert np.array_equal(np.load(before / "codebook.npy"), np.load(after / "codebook.npy"))
    assert np.array_equal(np.load(before / "train_bovws.npy"), np.load(after / "train_bovws.npy"))
    assert not np.array_equal(np.load(before / "dev_bovws.npy"), np.load(after / "dev_bovws.npy"))


def test_rerun_without_a_split_removes_its_old_files(cheap, cheap_cnn, tmp_path, capsys):
    manifest = copy_images(cheap, tmp_path)
    shutil.copytree(cheap["out"], tmp_path / "out")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(line for line in lines if not line.endswith("\ttest")) + "\n")
    run(manifest, tmp_path / "out")
    for granularity in ("coarse", "fine"):
        assert sorted(p.name for p in folder(tmp_path / "out", granularity).glob("test_*")) == []
    assert "removed" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input

def test_bad_image_stops_naming_it_then_skip_flag_skips_it(cheap, cheap_cnn, tmp_path, capsys):
    manifest = copy_images(cheap, tmp_path)
    broken = manifest.parent / cheap["rows"][1]["image"]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(SystemExit):
        run(manifest, tmp_path / "out")
    err = capsys.readouterr().err
    assert str(broken) in err and "--skip_bad_images" in err and "Traceback" not in err
    assert not (tmp_path / "out" / ".cache").exists()
    run(manifest, tmp_path / "out", "--skip_bad_images")
    summary = json.loads((folder(tmp_path / "out") / "summary.json").read_text())
    assert summary["splits"]["train"]["items"] == SPLIT_SIZES["train"] - 1
    assert [d["image"] for d in summary["dropped"]] == [str(broken)]
    assert np.load(folder(tmp_path / "out", "fine") / "train_cnns.npy").shape[0] == SPLIT_SIZES["train"] - 1


@pytest.mark.parametrize("content, message", [
    (None, "manifest not found"),
    ("image,caption,split\na.png,a cat,train\n", "missing column(s) label"),
    ("image,caption,label,split\ncircles/train_000.png,a cat,cat,val\n", "unknown split 'val'"),
    ("image,caption,label,split\nnowhere.png,a cat,cat,train\n", "nowhere.png: missing"),
    ("image,caption,label,split\ncircles/train_000.png,  ,cat,train\n", "empty 'caption'"),
])
def test_bad_manifest_is_one_clear_error(tmp_path, capsys, content, message):
    make_collection(tmp_path, {"train": 1})
    manifest = tmp_path / "m.csv"
    if content is not None:
        manifest.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit):
        run(manifest, tmp_path / "out")
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert str(manifest) in err or "nowhere.png" in err


def test_manifest_quoted_captions_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.csv"
    manifest.write_text('image,caption,label,split\nimg/a.png,"a cat,\non a mat",7,train\n/abs/b.png,dog,10,dev\n',
                        encoding="utf-8")
    items = read_manifest(manifest).items
    assert [(i.image, i.caption, i.label, i.split) for i in items] == [
        (tmp_path / "sub" / "img" / "a.png", "a cat, on a mat", "7", "train"),
        (Path("/abs/b.png"), "dog", "10", "dev")]


# ---------------------------------------------------------------- Corel 5K layout

COREL_WORDS = ["sky", "sun", "tree", "water", "grass", "bird"]
COREL_KEYWORDS = {"1000": ["sky", "sun"], "2000": ["tree", "grass", "bird"], "10000": ["water"]}
COREL_SHAPES = {"1000": "circles", "2000": "stripes", "10000": "squares"}


def make_corel(root: Path, annotation: str) -> None:
    """A tiny Corel-5K-like folder: 3 category folders, train/test lists, words, one annotation format.

    Image 2000/2003 (train) has no keyword of the dictionary and must be dropped.
    """
    lists = {"train": [], "test": []}
    for c, (category, shape) in enumerate(COREL_SHAPES.items()):
        for k in range(4):
            image_id = f"{category}/{int(category) + k}"
            (root / category).mkdir(parents=True, exist_ok=True)
            draw_image(shape, c * 10 + k).save(root / f"{image_id}.jpeg", quality=95)
            lists["test" if k == 0 else "train"].append(image_id)
    (root / "corel5k_words.txt").write_text("\n".join(COREL_WORDS) + "\n")
    for split, ids in lists.items():
        (root / f"corel5k_{split}_list.txt").write_text("\n".join(ids) + "\n")
        keywords = [[] if i == "2000/2003" else COREL_KEYWORDS[i.split("/")[0]] for i in ids]
        hot = np.array([[w in kw for w in COREL_WORDS] for kw in keywords], dtype=np.uint8)
        stem = root / f"corel5k_{split}_annot"
        if annotation == "mat":
            savemat(f"{stem}.mat", {"annot1" if split == "train" else "annot2": hot})
        elif annotation == "hvecs":
            records = [struct.pack("<i", len(COREL_WORDS)) + row.astype("<f4").tobytes() for row in hot]
            Path(f"{stem}.hvecs").write_bytes(b"".join(records))
        elif annotation == "txt-multi-hot":
            Path(f"{stem}.txt").write_text("".join(" ".join(map(str, row)) + "\n" for row in hot))
        elif annotation == "txt-keywords":
            Path(f"{stem}.txt").write_text("".join(" ".join(kw or ["zebra"]) + "\n" for kw in keywords))
        else:  # a keyword file beside every image
            for image_id, kw in zip(ids, keywords):
                (root / f"{image_id}.txt").write_text(" ".join(kw or ["zebra"]))


@pytest.mark.parametrize("annotation", ["mat", "hvecs", "txt-multi-hot", "txt-keywords", "sidecar"])
def test_corel_annotation_formats(tmp_path, annotation):
    make_corel(tmp_path / "Corel5k", annotation)
    collection = read_corel(tmp_path / "Corel5k", tmp_path / "unused")
    by_split = {s: [i for i in collection.items if i.split == s] for s in ("train", "dev")}
    assert [len(v) for v in by_split.values()] == [8, 3]
    assert [d["image"] for d in collection.dropped] == ["2000/2003.jpeg"]
    item = next(i for i in by_split["train"] if i.image.name == "2001.jpeg")
    assert (item.caption, item.label) == ("tree grass bird", "2000")


def test_corel_word_list_restricts_keywords(tmp_path):
    make_corel(tmp_path / "c", "mat")
    (tmp_path / "words.txt").write_text("sky\ntree\n")
    collection = read_corel(tmp_path / "c", tmp_path / "unused", str(tmp_path / "words.txt"))
    assert {i.caption for i in collection.items} == {"sky", "tree"}
    assert len(collection.dropped) == 1 + 4  # 2000/2003 and the four 10000 images (water only)


@pytest.fixture(scope="module")
def corel(tmp_path_factory) -> dict:
    """A Corel-like folder with .mat annotations and one run on it with the stand-in fc7."""
    base = tmp_path_factory.mktemp("corel")
    make_corel(base / "Corel5k", "mat")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "fc7_features", fake_fc7)
        run(base / "Corel5k", base / "out", source="--corel")
    return {"out": base / "out"}


def test_corel_folder_end_to_end(corel):
    d = folder(corel["out"], "fine")
    assert sorted(p.name for p in d.glob("*_caps.txt")) == ["dev_caps.txt", "train_caps.txt"]
    assert np.load(d / "train_bovws.npy").shape == (8, 9, 8)
    assert np.load(d / "dev_labels.npy").tolist() == [0, 1, 2]  # folders 1000, 2000, 10000 in numeric order
    assert (d / "dev_caps.txt").read_text().splitlines() == ["sky sun", "tree grass bird", "water"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["label_mapping"] == {"1000": 0, "2000": 1, "10000": 2}
    assert summary["dropped"] == [{"split": "train", "image": "2000/2003.jpeg", "keywords": [],
                                   "reason": "no keyword in the word list"}]


def test_corel_7z_archive_gives_the_same_files(corel, cheap_cnn, tmp_path, capsys):
    make_corel(tmp_path / "src" / "Corel5k", "hvecs")
    with py7zr.SevenZipFile(tmp_path / "Corel5K.7z", "w") as archive:
        archive.writeall(tmp_path / "src" / "Corel5k", arcname="Corel5k")
    run(tmp_path / "Corel5K.7z", tmp_path / "out", source="--corel")
    assert "dropped train 2000/2003.jpeg" in capsys.readouterr().out
    assert output_files(tmp_path / "out") == output_files(corel["out"])
    assert not (tmp_path / "out" / ".cache").exists()


def test_corel_folder_without_lists_says_what_was_expected(tmp_path, capsys):
    make_corel(tmp_path / "c", "mat")
    (tmp_path / "c" / "corel5k_test_list.txt").unlink()
    with pytest.raises(SystemExit):
        run(tmp_path / "c", tmp_path / "out", source="--corel")
    err = capsys.readouterr().err
    assert "no Corel 5K test_list found" in err and "corel5k_test_list.txt" in err
    assert "corel5k_train_list.txt" in err.split("Found")[1]


# ---------------------------------------------------------------- the training scripts read the output

def test_training_scripts_run_one_epoch_on_the_output(toy, tmp_path):
    out, vocab = toy["out"], str(tmp_path / "vocab")

    def script(name: str, *args: str) -> None:
        done = run_script(name, *args, cwd=str(tmp_path))
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    script("vocab.py", "--data_path", str(out / "coarse-grained-data"), "--data_name", NAME,
           "--vocab_path", vocab, "--threshold", "1")
    for name, granularity in (("train_global.py", "coarse"), ("train_local.py", "fine")):
        run_dir = str(tmp_path / name)
        script(name, "--data_path", str(out / f"{granularity}-grained-data"), "--data_name", NAME,
               "--vocab_path", vocab, "--logger_name", run_dir, "--model_name", run_dir, "--num_epochs", "1",
               "--batch_size", "8", "--device", "cpu", "--cnn_dim", "4096", "--bovw_dim", "8")
