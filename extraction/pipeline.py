"""The resumable run of prepare_data.py: read the collection, screen its images, fit the BoVW codebook on the
train split, compute the cached BoVW and CNN stages, write the precomp folders, drop the cache."""
from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

from tqdm import tqdm

from extraction import features
from runtime.errors import InputError
from runtime.layout import COARSE_FOLDER, FINE_FOLDER
from extraction.inputs import (SPLITS, Collection, Item, label_mapping, read_caption_json, read_class_lists,
                               read_corel, read_label_csv, read_manifest)
from extraction.stage_cache import digest, file_identity
from extraction.stages import backbone_on_device, bovw_stage, cnn_stage, codebook_for
from extraction.summary import summary
from extraction.writers import remove_stale_splits, write_records, write_split


def read_inputs(args: argparse.Namespace, cache_root: Path) -> Collection:
    """The collection named by --caption_json, --manifest or --corel (an archive unpacks into the cache)."""
    if args.caption_json:
        labels = read_class_lists(args.class_lists) if args.class_lists else read_label_csv(args.label_csv)
        return read_caption_json(args.caption_json, args.images, labels, args.class_lists or args.label_csv,
                                 args.captions_per_image, args.multi_label)
    if args.manifest:
        if args.word_list:
            raise InputError("--word_list applies to --corel only")
        return read_manifest(args.manifest)
    archive = Path(args.corel)
    unpack_to = cache_root / f"archive-{digest(file_identity(archive)) if archive.is_file() else ''}"
    return read_corel(archive, unpack_to, args.word_list)


def screen_images(items: list[Item], skip_bad: bool) -> tuple[list[Item], list[dict]]:
    """Decode every image once before any heavy work; stop on bad ones unless they are to be skipped."""
    bad = [(item, problem) for item in tqdm(items, desc="check images", unit="img", dynamic_ncols=True)
           if (problem := features.image_problem(item.image))]
    if len(bad) == 1 and not skip_bad:
        raise InputError(f"{bad[0][0].image}: {bad[0][1]}; fix or remove it, or pass --skip_bad_images")
    if bad and not skip_bad:
        listing = "\n".join(f"  {item.image}: {problem}" for item, problem in bad)
        raise InputError(f"{len(bad)} unusable image(s); fix or remove them, or pass --skip_bad_images:\n{listing}")
    for item, problem in bad:
        print(f"skipped {item.image}: {problem}")
    bad_items = {id(item) for item, _ in bad}
    dropped = [{"split": item.split, "image": str(item.image), "reason": problem} for item, problem in bad]
    return [item for item in items if id(item) not in bad_items], dropped


def usable_splits(collection: Collection, skip_bad: bool) -> tuple[dict[str, list[Item]], dict[str, int], list[dict]]:
    """The screened items of each split present, the label ids, and the images skipped as unusable."""
    for entry in collection.dropped:
        print(f"dropped {entry['split']} {entry['image']}: {entry['reason']}")
    items, bad = screen_images(collection.items, skip_bad)
    splits = {s: [i for i in items if i.split == s] for s in SPLITS if any(i.split == s for i in items)}
    if "train" not in splits:
        raise InputError("no usable train items: the BoVW codebook is fitted on the train split")
    return splits, label_mapping([name for i in items for name in i.labels]), bad


def drop_cache(cache_dir: str, cache_root: Path) -> None:
    """Delete this dataset's cache, and the cache folder too when nothing else is left in it."""
    shutil.rmtree(cache_root, ignore_errors=True)
    with contextlib.suppress(OSError):  # leave a shared or non-empty cache folder alone
        Path(cache_dir).rmdir()


def prepare(args: argparse.Namespace, cache_root: Path) -> None:
    """Make the precomp folders of prepare_data.py's parsed arguments, caching work under cache_root."""
    collection = read_inputs(args, cache_root)
    splits, labels, bad = usable_splits(collection, args.skip_bad_images)
    model, cnn_width, device = backbone_on_device(args)
    paths = {s: [i.image for i in v] for s, v in splits.items()}

    codebook, n_descriptors = codebook_for(paths["train"], args, cache_root)
    stages = {s: {"bovw": bovw_stage(p, s, codebook, args, cache_root)} for s, p in paths.items()}
    for s, p in paths.items():
        stages[s]["cnn"] = cnn_stage(p, s, model, device, args, cache_root)

    folders = {"coarse": Path(args.out_path) / COARSE_FOLDER / args.data_name,
               "fine": Path(args.out_path) / FINE_FOLDER / args.data_name}
    info = summary(args, collection, splits, labels, collection.dropped + bad, n_descriptors, cnn_width)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    remove_stale_splits(folders, splits)
    for s, v in splits.items():
        write_split(s, v, labels, collection.multi_label, stages[s], folders)
    write_records(folders, codebook, info)
    if not args.keep_cache:
        drop_cache(args.cache_dir, cache_root)
    counts = ", ".join(f"{s} {len(v)}" for s, v in splits.items())
    print(f"wrote {counts} items, {len(labels)} labels -> {folders['coarse']} and {folders['fine']}")
