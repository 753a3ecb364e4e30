"""Tokeniser and vocabulary (docs/METHOD.md section 2), plus the CLI that builds
`<vocab_path>/<data_name>_vocab.json`."""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from nltk.tokenize import NLTKWordTokenizer

from runtime.errors import InputError, check_number, report_errors
from runtime.files import atomic_write_bytes, check_writable, read_utf8
from runtime.layout import COARSE_FOLDER

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")
_TOKENIZER = NLTKWordTokenizer()  # word_tokenize(preserve_line=True) without the punkt download


def tokenize(caption: str) -> list[str]:
    """Lower-case and split a caption into NLTK word tokens."""
    return _TOKENIZER.tokenize(caption.lower())


class Vocabulary:
    """Word <-> index mapping; unknown words map to <unk>."""

    def __init__(self, words: list[str]):
        self.idx2word = list(words)
        self.word2idx = {w: i for i, w in enumerate(self.idx2word)}
        if len(self.word2idx) != len(self.idx2word):
            raise InputError("vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx["<unk>"])

    def encode(self, caption: str) -> list[int]:
        """[<start>] + token ids + [<end>]."""
        return [self.word2idx["<start>"]] + [self(t) for t in tokenize(caption)] + [self.word2idx["<end>"]]

    def to_json(self) -> dict:
        """The authors' serialised form."""
        return {"word2idx": self.word2idx,
                "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
                "idx": len(self)}

    @classmethod
    def from_word2idx(cls, word2idx: dict[str, int]) -> "Vocabulary":
        """Rebuild from a word -> index dict (indices must be 0..n-1, special tokens in place)."""
        words = sorted(word2idx, key=word2idx.get)
        if [word2idx[w] for w in words] != list(range(len(words))):
            raise InputError("vocabulary indices are not 0..n-1")
        if tuple(words[:4]) != SPECIAL_TOKENS:
            raise InputError(f"vocabulary must start with {SPECIAL_TOKENS}, found {tuple(words[:4])}")
        return cls(words)


def vocab_file(vocab_path: str, data_name: str) -> str:
    return os.path.join(vocab_path, f"{data_name}_vocab.json")


def read_captions(path: str) -> list[str]:
    """Caption lines of a file; a missing file or an empty caption is an InputError naming the file."""
    text = read_utf8(path, "caption file")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # \n, \r\n and \r end a caption
    if lines[-1] == "":  # the final newline ends the last caption, it does not start another
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not tokenize(line):
            raise InputError(f"{path}: line {number} is an empty caption")
    return lines


def build_vocab(caption_files: list[str], threshold: int = 2) -> Vocabulary:
    """Special tokens, then words counted at least `threshold` times, in order of first occurrence."""
    counts: Counter[str] = Counter()
    for path in caption_files:
        for caption in read_captions(path):
            counts.update(tokenize(caption))
    kept = [w for w, n in counts.items() if n >= threshold and w not in SPECIAL_TOKENS]
    return Vocabulary(list(SPECIAL_TOKENS) + kept)


def save_vocab(vocab: Vocabulary, path: str) -> None:
    atomic_write_bytes(path, json.dumps(vocab.to_json(), ensure_ascii=False).encode("utf-8"))


def load_vocab(path: str) -> Vocabulary:
    """Load a vocabulary JSON (ours or the authors')."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: vocabulary file not found; build it with "
                         f"`python vocab.py --data_path DATA --data_name NAME --vocab_path {os.path.dirname(path) or '.'}`")
    text = read_utf8(path, "vocabulary file")
    try:
        word2idx = json.loads(text)["word2idx"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a vocabulary JSON with a 'word2idx' table ({err})") from None
    try:
        return Vocabulary.from_word2idx(word2idx)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build the vocabulary of a precomp dataset.")
    p.add_argument("--data_path", default=f"./data/{COARSE_FOLDER}", help="folder holding <data_name>/")
    p.add_argument("--data_name", default="corel5k_precomp")
    p.add_argument("--vocab_path", default="./vocab", help="where <data_name>_vocab.json is written")
    p.add_argument("--threshold", type=int, default=2, help="keep words seen at least this often")
    p.add_argument("--splits", default="train,dev",
                   help="caption files counted; the authors use train,dev (use train to avoid the dev leak)")
    args = p.parse_args(argv)
    check_number("--threshold", args.threshold, minimum=1)
    if not all(args.splits.split(",")):
        raise InputError(f"--splits must be split names separated by commas, got {args.splits!r}")
    return args


@report_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_writable(args.vocab_path, "--vocab_path folder")
    folder = os.path.join(args.data_path, args.data_name)
    files = [os.path.join(folder, f"{s}_caps.txt") for s in args.splits.split(",")]
    vocab = build_vocab(files, args.threshold)
    out = vocab_file(args.vocab_path, args.data_name)
    save_vocab(vocab, out)
    print(f"vocabulary: {len(vocab)} entries ({len(vocab) - len(SPECIAL_TOKENS)} words) -> {out}")


if __name__ == "__main__":
    main()
