"""Feature preparation from raw images (prepare_data.py, extraction/) on small generated data.

Only two full runs use a real (randomly initialised) backbone, which is slow on a CPU; the other end-to-end
runs swap in a cheap stand-in for the CNN, since what they check (inputs, caching, BoVW, codebook, errors)
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

import prepare_data
from data import class_names, label_names, load_features, load_labels
from extraction import backbones, features
from extraction.inputs import label_mapping, read_corel, read_manifest
from extraction.stages import weights_identity
from extraction.summary import recorded_weights
from runtime.errors import InputError

from tests._images import draw_image, make_caption_json, make_collection, write_manifest
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


def fake_cnn(model, batch: np.ndarray, device) -> np.ndarray:
    """Cheap stand-in for the backbone: per-view channel means, tiled to the backbone's width."""
    return np.tile(batch.mean(axis=(2, 3)), (1, model.WIDTH // 3 + 1))[:, :model.WIDTH].astype(np.float32)


@pytest.fixture
def cheap_cnn(monkeypatch):
    monkeypatch.setattr(features, "cnn_features", fake_cnn)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A generated collection and one full run with the real (random-weight) AlexNet."""
    base = tmp_path_factory.mktemp("toy")
    manifest = write_manifest(base / "images" / "manifest.csv", make_collection(base / "images", SPLIT_SIZES))
    run(manifest, base / "out")
    return {"manifest": manifest, "out": base / "out"}


# ---------------------------------------------------------------- backbones

def test_alexnet_module_names_match_torchvision(tmp_path):
    assert list(backbones.AlexNet().state_dict()) == TORCHVISION_ALEXNET_KEYS
    reference = backbones.AlexNet()
    state = {k: torch.full_like(v, i) for i, (k, v) in enumerate(reference.state_dict().items())}
    torch.save(state, tmp_path / "alexnet.pth")
    model, width = backbones.build_backbone("alexnet", str(tmp_path / "alexnet.pth"))
    assert not model.training and width == 4096
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_fc7_is_second_linear_after_relu():
    model, _ = backbones.build_backbone("alexnet", "random", seed=1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled = torch.flatten(model.avgpool(model.features(x)), 1)
        expected = torch.relu(model.classifier[4](torch.relu(model.classifier[1](pooled))))
        assert torch.allclose(model.embed(x), expected)
    again, _ = backbones.build_backbone("alexnet", "random", seed=1)
    assert torch.equal(again.features[0].weight, model.features[0].weight)


def test_cnn_features_normalise_uint8_pixels_with_the_backbone_statistics():
    model, _ = backbones.build_backbone("alexnet", "random", seed=2)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    mean, std = np.array(backbones.IMAGENET_MEAN), np.array(backbones.IMAGENET_STD)
    normalised = (pixels / 255.0 - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        expected = model.fc7(torch.from_numpy(normalised).float()).numpy()
    np.testing.assert_allclose(features.cnn_features(model, pixels, torch.device("cpu")), expected, atol=1e-5)


def random_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Give every batch norm non-trivial statistics and affine parameters, so folding them is really tested."""
    gen = torch.Generator().manual_seed(0)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():
            for tensor, low, high in ((norm.running_mean, -0.5, 0.5), (norm.running_var, 0.5, 2.0),
                                      (norm.weight, 0.5, 1.5), (norm.bias, -0.2, 0.2)):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * (high - low) + low)


def test_fused_efficientnet_equals_the_unfused_network_in_float64():
    model = backbones.EfficientNetLite0().eval()
    random_batch_norm_statistics(model)
    model = model.double()
    fused = model.for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    pads = [m for m in fused.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert len(pads) == 5  # only the stride-2 convolutions keep TensorFlow's asymmetric 'same' padding
    # a small input keeps float64 fast; both networks pad exactly as for 224 x 224, so they still must agree
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.flatten(model._avg_pooling(model.extract_features(x)), 1)  # the package's own forward
        assert expected.shape == (1, 1280) and expected.abs().max() > 0.1
        torch.testing.assert_close(fused.embed(x), expected, rtol=0, atol=1e-6)


def test_efficientnet_imagenet_weights_load_offline_and_classify():
    path = Path(backbones.imagenet_source("efficientnet_lite0"))
    assert path.is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbones.EfficientNetLite0().load_state_dict(state, strict=True)  # raises on any missing or extra key
    model, width = backbones.build_backbone("efficientnet_lite0", "imagenet")
    assert width == 1280
    views = features.cnn_views(draw_image("circles", 0, size=(96, 96)))
    pixels = torch.from_numpy(views).float() / 255.0
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in (model.MEAN, model.STD))
    with torch.no_grad():
        probabilities = model((pixels - mean) / std).softmax(dim=1)
    assert probabilities.shape == (10, 1000) and torch.isfinite(probabilities).all()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(10))
    assert probabilities.max(dim=1).values.min() > 0.01  # trained weights: far from the uniform 0.001
    vectors = features.cnn_features(model, views, torch.device("cpu"))
    assert vectors.shape == (10, 1280) and vectors.min() >= 0 and vectors.max() <= 6  # pooled ReLU6


def test_cache_key_depends_on_the_backbone():
    keys = {weights_identity(b, w, 0) for b in backbones.BACKBONES for w in ("random", "imagenet")}
    assert len(keys) == 4


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
    assert "--cnn_backbone efficientnet_lite0" in err


@pytest.mark.parametrize("backbone", list(backbones.BACKBONES))
def test_weight_file_of_another_network_is_refused(tmp_path, backbone):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=f"not {backbone} weights"):
        backbones.build_backbone(backbone, str(tmp_path / "other.pth"))


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


def test_summary_records_a_weight_file_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # search.py, run from elsewhere, must still find the file
    assert recorded_weights("w/alexnet.pth") == str(tmp_path / "w" / "alexnet.pth")
    assert [recorded_weights(w) for w in ("imagenet", "random")] == ["imagenet", "random"]


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
    assert summary["cnn"]["weights"] == "random" and summary["cnn"]["backbone"] == "alexnet"
    assert summary["dims"]["cnn"] == 4096 and summary["captions_per_image"] == 1
    listed = [toy["manifest"].parent / line.split(",")[0] for line in toy["manifest"].read_text().splitlines()[1:]
              if line.endswith(",dev")]
    assert (folder(toy["out"], "fine") / "dev_images.txt").read_text().splitlines() == [str(p) for p in listed]
    assert {s: v["items"] for s, v in summary["splits"].items()} == SPLIT_SIZES
    assert np.load(folder(toy["out"]) / "codebook.npy").shape == (8, 128)
    assert not (toy["out"] / ".cache").exists()
    coarse = np.load(folder(toy["out"], "coarse") / "train_cnns.npy")
    assert np.abs(coarse).sum(axis=1).min() > 0


def test_block_feature_equals_block_extracted_alone(toy):
    fine = np.load(folder(toy["out"], "fine") / "dev_cnns.npy")
    rows = [r for r in (toy["manifest"].read_text().splitlines()[1:]) if r.endswith(",dev")]
    image = features.load_rgb(toy["manifest"].parent / rows[1].split(",")[0])
    model, _ = backbones.build_backbone("alexnet", "random", seed=3)
    for block in (0, 4, 8):
        alone = image.crop(features.grid_boxes(*image.size)[block])
        vector = features.cnn_features(model, features.cnn_tensor(alone)[None], torch.device("cpu"))[0]
        np.testing.assert_allclose(fine[1, block], vector, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def cheap(tmp_path_factory) -> dict:
    """A collection listed in a TSV manifest and one run with the stand-in fc7."""
    base = tmp_path_factory.mktemp("cheap")
    rows = make_collection(base / "images", SPLIT_SIZES, seed=1)
    manifest = write_manifest(base / "images" / "m.tsv", rows, delimiter="\t")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "cnn_features", fake_cnn)
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

    def counting_cnn(model, batch, device, stop_after=None):
        if stop_after is not None and calls["cnn"] >= stop_after:
            raise KeyboardInterrupt
        calls["cnn"] += len(batch) // features.N_VIEWS
        return fake_cnn(model, batch, device)

    def counting_sift(*args, **kwargs):
        calls["sift"] += 1
        return real_sift(*args, **kwargs)

    monkeypatch.setattr(features, "cnn_features", partial(counting_cnn, stop_after=4))
    with pytest.raises(SystemExit) as stop:  # Ctrl-C: one line, status 130
        run(cheap["manifest"], tmp_path / "out")
    assert stop.value.code == 130
    assert list((tmp_path / "out" / ".cache").rglob("part-*.npz")) and not folder(tmp_path / "out").exists()

    calls["cnn"] = 0
    monkeypatch.setattr(features, "cnn_features", counting_cnn)
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
    assert [(i.image, i.captions, i.labels, i.split) for i in items] == [
        (tmp_path / "sub" / "img" / "a.png", ("a cat, on a mat",), ("7",), "train"),
        (Path("/abs/b.png"), ("dog",), ("10",), "dev")]


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
    assert (item.captions, item.labels) == (("tree grass bird",), ("2000",))


def test_corel_word_list_restricts_keywords(tmp_path):
    make_corel(tmp_path / "c", "mat")
    (tmp_path / "words.txt").write_text("sky\ntree\n")
    collection = read_corel(tmp_path / "c", tmp_path / "unused", str(tmp_path / "words.txt"))
    assert {i.captions for i in collection.items} == {("sky",), ("tree",)}
    assert len(collection.dropped) == 1 + 4  # 2000/2003 and the four 10000 images (water only)


@pytest.fixture(scope="module")
def corel(tmp_path_factory) -> dict:
    """A Corel-like folder with .mat annotations and one run on it with the stand-in fc7."""
    base = tmp_path_factory.mktemp("corel")
    make_corel(base / "Corel5k", "mat")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "cnn_features", fake_cnn)
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
    from_archive, from_folder = output_files(tmp_path / "out"), output_files(corel["out"])
    listed = [name for name in from_folder if name.endswith("_images.txt")]
    for name in listed:  # the archive's images are listed where it was unpacked, inside the cache
        tails = [[Path(line).parts[-2:] for line in files.pop(name).decode().splitlines()]
                 for files in (from_archive, from_folder)]
        assert tails[0] == tails[1] and tails[0]
    assert len(listed) == 4 and from_archive == from_folder
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

GRANULARITY = {"train_global.py": "coarse", "train_local.py": "fine"}


def train_one_epoch(out: Path, tmp_path: Path, cnn_dim: int, scripts: tuple[str, ...] = tuple(GRANULARITY)) -> None:
    """vocab.py, then one training epoch of each listed script on prepare_data's output folder."""
    vocab = str(tmp_path / "vocab")

    def script(name: str, *args: str) -> None:
        done = run_script(name, *args, cwd=str(tmp_path))
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    script("vocab.py", "--data_path", str(out / "coarse-grained-data"), "--data_name", NAME,
           "--vocab_path", vocab, "--threshold", "1")
    for name in scripts:
        run_dir = str(tmp_path / name)
        script(name, "--data_path", str(out / f"{GRANULARITY[name]}-grained-data"), "--data_name", NAME,
               "--vocab_path", vocab, "--logger_name", run_dir, "--model_name", run_dir, "--num_epochs", "1",
               "--batch_size", "8", "--device", "cpu", "--cnn_dim", str(cnn_dim), "--bovw_dim", "8")


def test_training_scripts_run_one_epoch_on_the_output(toy, tmp_path):
    train_one_epoch(toy["out"], tmp_path, cnn_dim=4096)


# ---------------------------------------------------------------- caption file dataset_<name>.json

JSON_SIZES = {"train": 6, "val": 3, "test": 3}
JSON_SPLITS = {"train": "train", "dev": "val", "test": "test"}


def run_json(made: dict, out: Path, *extra: str, labels: tuple[str, ...] | None = None) -> None:
    labels = labels or ("--class_lists", str(made["classes"]))
    prepare_data.main(["--caption_json", str(made["json"]), "--images", str(made["images"]), *labels,
                       "--out_path", str(out), "--data_name", NAME, *SMALL, *extra])


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> dict:
    """A generated dataset_toy.json (3 captions per image) with class lists, and one run with the stand-in CNN."""
    base = tmp_path_factory.mktemp("json")
    made = make_caption_json(base, JSON_SIZES, captions=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "cnn_features", fake_cnn)
        run_json(made, base / "out")
    return {**made, "out": base / "out", "entries": json.loads(made["json"].read_text())["images"]}


def test_caption_json_writes_k_captions_per_feature_row(captioned):
    for split, json_split in JSON_SPLITS.items():
        entries = [e for e in captioned["entries"] if e["split"] == json_split]
        for granularity in ("coarse", "fine"):
            d = folder(captioned["out"], granularity)
            captions = (d / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
            assert len(captions) == 3 * len(entries) == 3 * len(np.load(d / f"{split}_cnns.npy"))
            for j, caption in enumerate(captions):  # caption j describes feature row j // 3
                assert caption == " ".join(entries[j // 3]["sentences"][j % 3]["raw"].split())
            images = (d / f"{split}_images.txt").read_text(encoding="utf-8").splitlines()
            assert images == [str(captioned["images"] / e["filename"]) for e in entries]
            labels = np.load(d / f"{split}_labels.npy")
            assert labels.shape == (len(entries),)
            assert labels.tolist() == [k % 3 for k in range(len(entries))]  # circles, squares, stripes in turn
    summary = json.loads((folder(captioned["out"]) / "summary.json").read_text())
    assert summary["captions_per_image"] == 3 and summary["splits"]["dev"] == {"items": 3, "captions": 9, "labels": 3}
    assert class_names(str(folder(captioned["out"], "fine"))) == ["circles", "squares", "stripes"]  # the file names


def test_captions_per_image_keeps_the_first_k(captioned, cheap_cnn, tmp_path):
    run_json(captioned, tmp_path / "out", "--captions_per_image", "2")
    captions = (folder(tmp_path / "out") / "train_caps.txt").read_text(encoding="utf-8").splitlines()
    entries = [e for e in captioned["entries"] if e["split"] == "train"]
    assert captions == [" ".join(e["sentences"][j]["raw"].split()) for e in entries for j in range(2)]


def test_label_csv_gives_the_same_labels_as_class_lists(captioned, cheap_cnn, tmp_path):
    rows = [f"{name},{path.stem}" for path in sorted(captioned["classes"].glob("*.txt"))
            for name in path.read_text().split()]
    (tmp_path / "labels.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    run_json(captioned, tmp_path / "out", labels=("--label_csv", str(tmp_path / "labels.csv")))
    assert output_files(tmp_path / "out") == output_files(captioned["out"])
    assert class_names(str(folder(tmp_path / "out"))) == ["circles", "squares", "stripes"]  # the CSV's values


def test_multi_label_class_lists_give_multi_hot_labels(captioned, cheap_cnn, tmp_path):
    shutil.copytree(captioned["classes"], tmp_path / "classes")
    (tmp_path / "classes" / "round.txt").write_text("train_000.png\ntest_001.png\n")
    made = {**captioned, "classes": tmp_path / "classes"}
    run_json(made, tmp_path / "out", "--multi_label")
    labels = load_labels(str(folder(tmp_path / "out") / "train_labels.npy"))
    assert labels.shape == (6, 4)  # classes circles, round, squares, stripes
    assert labels[0].tolist() == [1, 1, 0, 0] and labels[1].tolist() == [0, 0, 1, 0]
    assert label_names(labels[0], class_names(str(folder(tmp_path / "out")))) == ["circles", "round"]
    assert load_labels(str(folder(tmp_path / "out") / "test_labels.npy"))[1].tolist() == [0, 1, 1, 0]


def _drop_entry(made: dict, name: str) -> None:
    data = json.loads(made["json"].read_text())
    data["images"] = [e for e in data["images"] if e["filename"] != name]
    made["json"].write_text(json.dumps(data))


def _edit_entry(made: dict, name: str, **changes) -> None:
    data = json.loads(made["json"].read_text())
    next(e for e in data["images"] if e["filename"] == name).update(changes)
    made["json"].write_text(json.dumps(data))


@pytest.mark.parametrize("break_it, extra, message", [
    (lambda m: (m["images"] / "val_001.png").unlink(), (), "val_001.png: missing"),
    (lambda m: (m["classes"] / "circles.txt").write_text("train_000.png\n"), (), "no label for train_003.png"),
    (lambda m: (m["classes"] / "extra.txt").write_text("test_002.png\n"), (), "test_002.png has 2 labels"),
    (lambda m: [_drop_entry(m, f"test_{k:03d}.png") for k in range(3)], (), "no images in split 'test'"),
    (lambda m: _edit_entry(m, "val_002.png", sentences=[{"raw": "one"}]), (), "have 1 to 3 captions (val_002.png: 1)"),
    (lambda m: _edit_entry(m, "val_002.png", sentences=[{"raw": "one"}]), ("--captions_per_image", "2"),
     "val_002.png has 1 captions, fewer than --captions_per_image 2"),
    (lambda m: _edit_entry(m, "train_001.png", split="holdout"), (), "unknown split 'holdout'"),
    (lambda m: _edit_entry(m, "train_001.png", sentences=[{"raw": " "}] * 3), (), "sentence 0 is empty"),
    (lambda m: _edit_entry(m, "train_001.png", filepath="../.."), (),
     "(train_001.png): the image path ../../train_001.png leaves the --images folder"),
    (lambda m: _edit_entry(m, "train_001.png", filename="/etc/hostname"), (), "leaves the --images folder"),
    (lambda m: _edit_entry(m, "train_001.png", filename="train_000.png", filepath="other"), (),
     "(train_000.png) and images[1] (other/train_000.png) have the same file name train_000.png"),
    (lambda m: (m["classes"] / "zz.txt").write_text("elsewhere/train_000.png\n"), (),
     "zz.txt: line 1: elsewhere/train_000.png and train_000.png"),
])
def test_bad_caption_json_input_is_one_line_naming_it(tmp_path, capsys, break_it, extra, message):
    made = make_caption_json(tmp_path, JSON_SIZES, captions=3)
    break_it(made)
    with pytest.raises(SystemExit):
        run_json(made, tmp_path / "out", *extra)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and err.rstrip().endswith(errors[0]) and "Traceback" not in err


def test_caption_json_flags_are_checked(tmp_path, capsys):
    made = make_caption_json(tmp_path, {"train": 1, "val": 1, "test": 1})
    with pytest.raises(SystemExit):
        prepare_data.main(["--caption_json", str(made["json"]), "--images", str(made["images"])])
    assert "--class_lists DIR or --label_csv FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_data.main(["--manifest", "m.csv", "--captions_per_image", "2"])
    assert "apply to --caption_json only" in capsys.readouterr().err
    args = prepare_data.parse_args(["--caption_json", "x/dataset_rsicd.json", "--images", "i", "--label_csv", "l"])
    assert args.data_name == "rsicd_precomp" and args.cnn_backbone == "alexnet"


def test_efficientnet_end_to_end_and_the_width_error_names_the_flag(tmp_path, capsys):
    made = make_caption_json(tmp_path, {"train": 4, "val": 1, "test": 1}, captions=2)
    run_json(made, tmp_path / "out", "--cnn_backbone", "efficientnet_lite0")
    coarse, fine = folder(tmp_path / "out"), folder(tmp_path / "out", "fine")
    assert np.load(coarse / "train_cnns.npy").shape == (4, 1280)
    assert np.load(fine / "train_cnns.npy").shape == (4, 9, 1280)
    summary = json.loads((coarse / "summary.json").read_text())
    assert summary["cnn"]["backbone"] == "efficientnet_lite0" and summary["dims"]["cnn"] == 1280
    with pytest.raises(InputError, match="the files hold efficientnet_lite0 features: use --cnn_dim 1280"):
        load_features(str(coarse / "train_cnns.npy"), "global", 4096, "--cnn_dim")
    with pytest.raises(InputError, match="--bovw_dim 500; the files hold 8-wide features: use --bovw_dim 8"):
        load_features(str(fine / "train_bovws.npy"), "local", 500, "--bovw_dim")
    train_one_epoch(tmp_path / "out", tmp_path, cnn_dim=1280, scripts=("train_global.py",))  # 2 captions per row
