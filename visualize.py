"""Pictures of what trained subnetworks retrieve and where the local one looks (PNG files).

  python visualize.py --global_ckpt G --local_ckpt L --split test --out_dir figures --queries 4

Writes to --out_dir:
  text_to_image.png   caption queries, each with its top 5 images framed green (relevant: a shared
                      category; with --relevance instance: the caption's own image) or red
  image_to_text.png   image queries, each with its top 5 captions in green or red
  attention_<j>.png   with a local checkpoint: one image and its caption j, each word's attention
                      weights over the 3x3 blocks drawn on the image
Retrieval uses the fused score (w given, or tuned on dev) when both checkpoints are given. The images
are read from --images_file, one path per feature row (prepare_data.py writes <split>_images.txt).
"""
from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data import class_names, label_names, split_file
from evaluation import SubnetworkConfig, add_subnetwork_arguments, check_subnetwork_arguments, open_split, score_rows
from metrics import protocol_labels, relevance
from model_local import text_to_image_attention
from runtime.errors import InputError, report_errors
from runtime.files import atomic_write, check_writable
from vocab import read_captions

TOP = 5
GREEN, RED = (40, 160, 60), (200, 40, 40)
THUMB = 192  # pixels of the longer side of a drawn image
RELEVANT_MEANS = {"label": "shared category", "instance": "the caption describes that very image"}


@dataclass(frozen=True)
class FigureConfig(SubnetworkConfig):
    """Which figures to draw and where (visualize.py's flags, whose defaults are these)."""

    images_file: str = ""  # image path of each feature row; "": <data>/<split>_images.txt
    out_dir: str = "figures"
    queries: int = 4  # queries per figure (and attention figures)
    seed: int = 0  # of the query choice
    tune_fusion: bool = False  # w: the best on dev instead of fusion_weight


def parse_args(argv: list[str] | None = None) -> FigureConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subnetwork_arguments(p, "draw")
    d = FigureConfig()
    p.add_argument("--images_file", default=d.images_file, help="image path of each feature row "
                   "(default: <data>/<split>_images.txt); relative paths are read from its folder")
    p.add_argument("--out_dir", default=d.out_dir)
    p.add_argument("--queries", type=int, default=d.queries, help="queries per figure (and attention figures)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the query choice")
    p.add_argument("--tune_fusion", action="store_true", help="pick w on dev by the --relevance protocol's rsum")
    args = p.parse_args(argv)
    if not (args.global_ckpt or args.local_ckpt):
        p.error("give --global_ckpt, --local_ckpt or both")
    if args.queries < 1:
        p.error("--queries must be at least 1")
    if args.seed < 0:
        p.error("--seed must be at least 0 (numpy's generators take no negative seed)")
    check_subnetwork_arguments(p, args)
    return FigureConfig.from_flags(args)


def read_image_paths(path: str, count: int) -> list[str]:
    """One image path per feature row; every one must exist."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: images file not found (prepare_data.py writes it; or pass --images_file)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    if len(lines) != count:
        raise InputError(f"{path}: {len(lines)} image paths for {count} feature rows")
    paths = [p if os.path.isabs(p) else os.path.join(os.path.dirname(path), p) for p in lines]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{path}: {len(missing)} listed images do not exist (first: {missing[0]})")
    return paths


def thumbnail(path: str, frame: tuple[int, int, int] | None = None) -> Image.Image:
    """An RGB image scaled to THUMB pixels, with a coloured frame when given."""
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None
    image.thumbnail((THUMB, THUMB))
    return ImageOps.expand(image, border=max(4, THUMB // 24), fill=frame) if frame else image


class ScoredSplit:
    """A split's similarities, images, captions and relevance, as the figures need them."""

    def __init__(self, config: FigureConfig):
        opened = open_split(config, config.tune_fusion)
        nets, self.split, weight = opened.nets, opened.split, opened.weight
        rows = score_rows(nets, self.split, weight)
        self.score_name = "fused" if weight is not None else nets[0].kind
        self.sims = rows[self.score_name]  # (images, captions)
        self.describe = f"{self.score_name} score" + (f", w = {weight:.2f}" if weight is not None else "")
        self.local = next((net for net in nets if net.kind == "local"), None)
        dataset = nets[0].dataset(self.split)
        folder = os.path.join(nets[0].data_path, nets[0].data_name)
        self.captions = read_captions(split_file(folder, self.split, "caps"))
        self.images = read_image_paths(config.images_file or os.path.join(folder, f"{self.split}_images.txt"),
                                       self.sims.shape[0])
        self.captions_per_image = dataset.captions_per_image
        labels = protocol_labels(config.relevance, dataset.labels.numpy(), dataset.caption_labels.numpy())
        self.relevant = relevance(*(torch.from_numpy(x) for x in labels)).numpy()  # (images, captions)
        self.meaning = RELEVANT_MEANS[config.relevance]
        names = class_names(folder)
        self.classes = [label_names(label, names) for label in dataset.labels] if names else None

    def named(self, image: int) -> str:
        """' (class name)' of an image row when the data records class names, else ''."""
        return f" ({', '.join(np.atleast_1d(self.classes[image]))})" if self.classes else ""

    def image_of_caption(self, caption: int) -> int:
        """Row of the image a caption describes."""
        return caption // self.captions_per_image


def ranked(scores: np.ndarray) -> np.ndarray:
    """Indices of the TOP best scores, best first, ties in index order."""
    return np.argsort(-scores, kind="stable")[:TOP]


def plt_figure(rows: int, cols: int, width: float, height: float, width_ratios: list[float] | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False,
                             gridspec_kw={"width_ratios": width_ratios})
    for ax in axes.flat:
        ax.axis("off")
    return plt, fig, axes


def save(plt, fig, path: str) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    print(f"wrote {path}")


def wrapped(text: str, width: int = 24, lines: int = 5) -> str:
    return "\n".join(textwrap.wrap(text, width)[:lines])


def draw_text_to_image(scored: ScoredSplit, queries: np.ndarray, path: str) -> None:
    """Each caption query, then its top images framed green (relevant) or red."""
    plt, fig, axes = plt_figure(len(queries), TOP + 1, 2.2 * (TOP + 1), 2.0 * len(queries))
    for row, caption in zip(axes, queries):
        named = scored.named(scored.image_of_caption(caption))
        row[0].text(0.0, 0.5, f"caption {caption}{named}:\n" + wrapped(scored.captions[caption]), va="center",
                    fontsize=10, wrap=True)
        for rank, (ax, image) in enumerate(zip(row[1:], ranked(scored.sims[:, caption])), 1):
            hit = scored.relevant[image, caption]
            ax.imshow(thumbnail(scored.images[image], GREEN if hit else RED))
            ax.set_title(f"#{rank}  {scored.sims[image, caption]:.3f}{scored.named(image)}", fontsize=9)
    fig.suptitle(f"caption -> image, {scored.split} split, {scored.describe}; green: relevant "
                 f"({scored.meaning}), red: not", fontsize=11)
    save(plt, fig, path)


def draw_image_to_text(scored: ScoredSplit, queries: np.ndarray, path: str) -> None:
    """Each image query, then its top captions in green (relevant) or red."""
    plt, fig, axes = plt_figure(len(queries), 2, 11.0, 2.0 * len(queries), width_ratios=[1, 3.5])
    for (image_ax, text_ax), image in zip(axes, queries):
        image_ax.imshow(thumbnail(scored.images[image]))
        image_ax.set_title(f"image {image}{scored.named(image)}", fontsize=9)
        for rank, caption in enumerate(ranked(scored.sims[image]), 1):
            hit = scored.relevant[image, caption]
            text = textwrap.shorten(scored.captions[caption], 80)
            text_ax.text(0.0, 1.0 - rank / (TOP + 1), f"#{rank}  {scored.sims[image, caption]:.3f}  {text}",
                         color=np.array(GREEN if hit else RED) / 255, fontsize=10, va="center")
    fig.suptitle(f"image -> caption, {scored.split} split, {scored.describe}; green: relevant "
                 f"({scored.meaning}), red: not", fontsize=11)
    save(plt, fig, path)


@torch.no_grad()
def word_attention(scored: ScoredSplit, caption: int) -> tuple[list[str], np.ndarray]:
    """Tokens of a caption (with <start> and <end>) and their attention weights (words x 9 blocks)."""
    net = scored.local
    cnn, _, tokens, *_ = net.dataset(scored.split)[caption]
    lengths = torch.tensor([len(tokens)])
    blocks, words = net.model.encode_primary(cnn[None].to(net.device), tokens[None].to(net.device), lengths)
    weights = text_to_image_attention(words[0], blocks[0], net.model.raw_feature_norm, net.model.lambda_softmax)
    return [net.vocab.idx2word[int(t)] for t in tokens], weights.cpu().numpy()


def draw_attention(scored: ScoredSplit, caption: int, path: str) -> None:
    """The image of a caption, then one panel per word with its attention over the 3x3 blocks."""
    words, weights = word_attention(scored, caption)
    image = thumbnail(scored.images[scored.image_of_caption(caption)])
    width, height = image.size
    grid = int(round(weights.shape[1] ** 0.5))
    cols = min(len(words) + 1, 7)
    rows = -(-(len(words) + 1) // cols)
    plt, fig, axes = plt_figure(rows, cols, 2.4 * cols, 2.5 * rows)
    axes = axes.flat
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for ax, word, w in zip(axes[1:], words, weights):
        ax.imshow(image)
        # Blocks are row-major from the top left, as the features were cut.
        ax.imshow(w.reshape(grid, grid), cmap="inferno", alpha=0.55, vmin=0.0, vmax=float(weights.max()),
                  extent=(0, width, height, 0), interpolation="nearest")
        for k, value in enumerate(w):
            ax.text((k % grid + 0.5) * width / grid, (k // grid + 0.5) * height / grid, f"{value:.2f}",
                    ha="center", va="center", fontsize=7, color="white")
        ax.set_title(word, fontsize=10)
    fig.suptitle(f"local attention of caption {caption} over its image's 3x3 blocks ({scored.split} split; "
                 "each word's weights sum to 1, <unk>: a word outside the vocabulary)\n"
                 + wrapped(scored.captions[caption], 90, 2), fontsize=10)
    save(plt, fig, path)


@report_errors
def main(argv: list[str] | None = None) -> list[str]:
    """Draw the figures; returns the paths written."""
    config = parse_args(argv)
    check_writable(config.out_dir, "--out_dir")
    scored = ScoredSplit(config)
    rng = np.random.default_rng(config.seed)
    n_images, n_captions = scored.sims.shape
    caption_queries = rng.choice(n_captions, min(config.queries, n_captions), replace=False)
    image_queries = rng.choice(n_images, min(config.queries, n_images), replace=False)
    paths = [os.path.join(config.out_dir, "text_to_image.png"), os.path.join(config.out_dir, "image_to_text.png")]
    draw_text_to_image(scored, caption_queries, paths[0])
    draw_image_to_text(scored, image_queries, paths[1])
    if scored.local is None:
        print("notice: no --local_ckpt, so no attention figures")
        return paths
    for caption in caption_queries:
        paths.append(os.path.join(config.out_dir, f"attention_{caption}.png"))
        draw_attention(scored, int(caption), paths[-1])
    return paths


if __name__ == "__main__":
    main()
