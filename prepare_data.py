"""Turn raw images, texts and labels into the precomp folders that the training scripts read.

    python prepare_data.py --corel Corel5K.7z     # -> ./data/{coarse,fine}-grained-data/corel5k_precomp/
    python prepare_data.py --manifest mydata/manifest.csv --data_name mydata_precomp
    python prepare_data.py --caption_json dataset_rsicd.json --images RSICD_images --class_lists txtclasses_rsicd \
        --cnn_backbone efficientnet_lite0       # -> rsicd_precomp, 5 captions per image

Writes, for each split present (train, dev, test), {split}_cnns.npy ((N, W) coarse, (N, 9, W) fine; W = 4096
for AlexNet, 1280 for EfficientNet-Lite0), {split}_bovws.npy ((N, K) / (N, 9, K)), {split}_caps.txt (k lines
per image: caption j describes row j // k), {split}_labels.npy and {split}_images.txt (the image of each row),
plus codebook.npy and summary.json. Work is cached in chunks of images, so an interrupted run resumes
(the run itself: extraction/pipeline.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from extraction import backbones, pipeline
from runtime.errors import report_errors
from runtime.files import check_writable
from runtime.layout import COARSE_FOLDER, FINE_FOLDER


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Extract M2HSE features (ImageNet CNN and dense-SIFT BoVW, whole "
                                            "image and 3x3 grid) from raw images into the precomp layout.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV/TSV with header image,caption,label,split (paths relative to it)")
    source.add_argument("--corel", help="Corel 5K folder or its .7z archive")
    source.add_argument("--caption_json", help="caption file dataset_<name>.json (images[].filename, split, "
                                               "sentences[].raw); needs --images and --class_lists or --label_csv")
    p.add_argument("--images", help="--caption_json: folder holding the image files")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--class_lists", help="--caption_json: folder of <class>.txt, one image file name a line")
    labels.add_argument("--label_csv", help="--caption_json: CSV with header filename,label")
    p.add_argument("--multi_label", action="store_true",
                   help="--caption_json: an image may have several labels; labels are written multi-hot (N, C)")
    p.add_argument("--captions_per_image", type=_positive,
                   help="--caption_json: keep the first K captions of each image (default: all)")
    p.add_argument("--word_list", help="Corel keyword vocabulary, one word a line (default: the dictionary file)")
    p.add_argument("--out_path", default="./data", help=f"writes <out>/{COARSE_FOLDER} and {FINE_FOLDER}")
    p.add_argument("--data_name", help="dataset folder name (default corel5k_precomp, <manifest>_precomp, or "
                                       "<name>_precomp for dataset_<name>.json)")
    p.add_argument("--cnn_backbone", default="alexnet", choices=tuple(backbones.BACKBONES),
                   help="alexnet: fc7, 4096-d (the paper's); efficientnet_lite0: pooled, 1280-d, weights installed")
    p.add_argument("--cnn_weights", default="imagenet",
                   help="imagenet (AlexNet: official file, downloaded once; EfficientNet-Lite0: the installed "
                        "file), random (seeded, for tests) or a .pth state dict")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch_size", type=_positive, default=16, help="images per CNN batch (10 views each)")
    p.add_argument("--workers", type=int, default=0, help="worker processes decoding images and computing SIFT")
    p.add_argument("--sift_step", type=_positive, default=8, help="pixels between dense SIFT keypoints")
    p.add_argument("--sift_size", type=_positive, default=16,
                   help="side in pixels of the patch each dense SIFT descriptor describes")
    p.add_argument("--codebook_size", type=_positive, default=500, help="visual words (BoVW width)")
    p.add_argument("--codebook_samples", type=_positive, default=100_000,
                   help="training descriptors sampled for k-means")
    p.add_argument("--seed", type=int, default=0, help="seeds descriptor sampling, k-means and random weights")
    p.add_argument("--chunk_size", type=_positive, default=128, help="images per resumable cache part")
    p.add_argument("--cache_dir", help="resume cache (default <out_path>/.cache)")
    p.add_argument("--keep_cache", action="store_true", help="keep the cache after a successful run")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="skip (and report) missing or unreadable images instead of stopping")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    if args.seed < 0:
        p.error(f"--seed must be 0 or more, got {args.seed}")
    json_only = [f"--{k}" for k in ("images", "class_lists", "label_csv", "multi_label", "captions_per_image")
                 if getattr(args, k)]
    if args.caption_json and not (args.images and (args.class_lists or args.label_csv)):
        p.error("--caption_json needs --images DIR and the labels: --class_lists DIR or --label_csv FILE")
    if not args.caption_json and json_only:
        p.error(f"{', '.join(json_only)} apply to --caption_json only")
    if args.data_name is None:
        args.data_name = default_data_name(args)
    if args.cache_dir is None:
        args.cache_dir = str(Path(args.out_path) / ".cache")
    return args


def default_data_name(args: argparse.Namespace) -> str:
    """corel5k_precomp, <manifest stem>_precomp, or <name>_precomp for dataset_<name>.json."""
    if args.corel:
        return "corel5k_precomp"
    stem = Path(args.manifest or args.caption_json).stem
    return f"{stem.removeprefix('dataset_') if args.caption_json else stem}_precomp"


@report_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cache_root = Path(args.cache_dir) / args.data_name
    for folder in (args.out_path, cache_root):  # before any image is read
        check_writable(str(folder))
    pipeline.prepare(args, cache_root)


if __name__ == "__main__":
    main()
