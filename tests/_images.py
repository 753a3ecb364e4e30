"""Small generated image-text collections for the data-preparation tests: one drawn motif per category."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = {  # label -> (background colour, caption words)
    "circles": ((200, 40, 40), "red circle ball"),
    "squares": ((40, 90, 200), "blue square box"),
    "stripes": ((40, 170, 60), "green stripe grass"),
}


def draw_image(label: str, seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A textured image of one category: its colour, its motif drawn a few times at seeded places."""
    rng = random.Random(seed)
    colour = CATEGORIES[label][0]
    image = Image.new("RGB", size, tuple(min(255, c + rng.randint(-20, 20)) for c in colour))
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(6):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randint(4, 12)
        ink = tuple(rng.randrange(256) for _ in range(3))
        if label == "circles":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink, outline=(0, 0, 0))
        elif label == "squares":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=ink, outline=(255, 255, 255))
        else:
            draw.line((0, y, width, (y + r * 3) % height), fill=ink, width=3)
    return image


def make_collection(folder: Path, per_split: dict[str, int], seed: int = 0, suffix: str = ".png") -> list[dict]:
    """Write images (category folders) and return manifest rows; categories cycle within each split."""
    rows, labels, counter = [], list(CATEGORIES), 0
    for split, count in per_split.items():
        for k in range(count):
            label = labels[k % len(labels)]
            path = folder / label / f"{split}_{k:03d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_image(label, seed * 1000 + counter).save(path)
            rows.append({"image": path.relative_to(folder).as_posix(), "caption": CATEGORIES[label][1],
                         "label": label, "split": split})
            counter += 1
    return rows


def write_manifest(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    """Manifest file with the header image,caption,label,split."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "label", "split"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_caption_json(folder: Path, per_split: dict[str, int], captions: int = 3, seed: int = 0) -> dict[str, Path]:
    """A dataset_toy.json caption file (splits train / val / test), its flat image folder and a folder of
    class lists (<label>.txt, one image file name a line); categories cycle within each split."""
    images, lists = folder / "images", folder / "classes"
    images.mkdir(parents=True, exist_ok=True)
    lists.mkdir(parents=True, exist_ok=True)
    entries, members, labels = [], {label: [] for label in CATEGORIES}, list(CATEGORIES)
    for split, count in per_split.items():
        for k in range(count):
            label, name = labels[k % len(labels)], f"{split}_{k:03d}.png"
            draw_image(label, seed * 1000 + len(entries)).save(images / name)
            members[label].append(name)
            sentences = [{"raw": f"{CATEGORIES[label][1]}\n number {len(entries)} take {j}", "sentid": j}
                         for j in range(captions)]
            entries.append({"filename": name, "imgid": len(entries), "split": split, "sentences": sentences})
    for label, names in members.items():
        (lists / f"{label}.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    caption_json = folder / "dataset_toy.json"
    caption_json.write_text(json.dumps({"images": entries, "dataset": "toy"}), encoding="utf-8")
    return {"json": caption_json, "images": images, "classes": lists}
