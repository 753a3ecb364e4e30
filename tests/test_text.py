"""Tokeniser and vocabulary (vocab.py) against docs/METHOD.md section 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from nltk.tokenize import word_tokenize

from runtime.errors import InputError
from vocab import Vocabulary, build_vocab, load_vocab, read_captions, save_vocab, tokenize

REAL_DATA = (Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "corel5k_text").resolve()
SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]

CAPTIONS = [
    "sky sun clouds",
    "sky sun clouds ",
    "  Jet   Plane\tRunway  ",
    "An F-16 jet, flying over the sea!",
    "f-16 formation smoke",
    "It's 3.5 km (2 miles)... isn't it?",
    "Café naïve RÉSUMÉ — “quoted” text",
    "Über straße 1,000,000 $12.50 50% e-mail: a@b.com x--y",
    'Mr. Smith said "no". Then left.',
    "tiger; cat: BEAR/polar bear & fox",
    "1999 2000s 3rd #42",
]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_tokenize_equals_nltk_preserve_line(caption):
    expected = word_tokenize(caption.lower(), preserve_line=True)
    assert tokenize(caption) == expected


def test_tokenize_examples():
    assert tokenize("An F-16 jet, flying!") == ["an", "f-16", "jet", ",", "flying", "!"]
    assert tokenize("sky sun clouds ") == ["sky", "sun", "clouds"]
    assert tokenize("Café NAÏVE") == ["café", "naïve"]
    assert tokenize("   ") == []


def write_caps(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_vocabulary_special_tokens_threshold_and_order(tmp_path):
    train = write_caps(tmp_path / "train_caps.txt", ["b a c", "a d b", "e c a", "d f"])
    dev = write_caps(tmp_path / "dev_caps.txt", ["g e", "h g A"])
    # counts over train+dev: b2 a4 c2 d2 e2 f1 g2 h1, first occurrence b a c d e f g h
    vocab = build_vocab([train, dev], threshold=2)
    assert vocab.idx2word == SPECIALS + ["b", "a", "c", "d", "e", "g"]
    assert [vocab.word2idx[w] for w in SPECIALS] == [0, 1, 2, 3]
    assert list(vocab.word2idx) == vocab.idx2word
    assert len(vocab) == 10
    assert build_vocab([train, dev], threshold=3).idx2word == SPECIALS + ["a"]
    assert build_vocab([train, dev], threshold=1).idx2word == SPECIALS + list("bacdefgh")
    # train only: e and g seen once there
    assert build_vocab([train], threshold=2).idx2word == SPECIALS + ["b", "a", "c", "d"]


def test_unknown_words_and_encode(tmp_path):
    vocab = build_vocab([write_caps(tmp_path / "c.txt", ["sky sun", "sun sky", "tiger"])], threshold=2)
    assert vocab.idx2word == SPECIALS + ["sky", "sun"]
    assert vocab("sky") == 4 and vocab("tiger") == 3 and vocab("never-seen") == 3
    assert vocab.encode("Sun TIGER sky") == [1, 5, 3, 4, 2]
    assert vocab.encode("sky") == [1, 4, 2]  # length counts <start> and <end>


def test_json_round_trip_in_authors_format(tmp_path):
    vocab = build_vocab([write_caps(tmp_path / "c.txt", ["f-16 jet", "jet f-16 café", "café"])], threshold=2)
    path = tmp_path / "vocab" / "toy_vocab.json"
    save_vocab(vocab, str(path))
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert set(raw) == {"word2idx", "idx2word", "idx"}
    assert raw["word2idx"] == {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "f-16": 4, "jet": 5, "café": 6}
    assert list(raw["word2idx"]) == vocab.idx2word
    assert raw["idx2word"] == {str(i): w for i, w in enumerate(vocab.idx2word)}
    assert raw["idx"] == 7
    loaded = load_vocab(str(path))
    assert loaded.idx2word == vocab.idx2word and loaded.word2idx == vocab.word2idx


def test_load_hand_written_authors_json(tmp_path):
    words = SPECIALS + ["city", "mountain", "sky"]
    path = tmp_path / "authors_vocab.json"
    path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}))
    vocab = load_vocab(str(path))
    assert isinstance(vocab, Vocabulary)
    assert vocab.idx2word == words and vocab("mountain") == 5 and vocab("sea") == 3


def test_load_vocab_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "corel5k_precomp_vocab.json"
    with pytest.raises(InputError) as err:
        load_vocab(str(missing))
    assert str(missing) in str(err.value)


def test_empty_caption_line_names_file_and_line(tmp_path):
    path = write_caps(tmp_path / "train_caps.txt", ["sky sun", "   ", "sea"])
    with pytest.raises(InputError) as err:
        read_captions(path)
    assert path in str(err.value) and "line 2" in str(err.value)
    with pytest.raises(InputError) as err:
        build_vocab([path])
    assert path in str(err.value) and "line 2" in str(err.value)
    # a trailing newline is not an empty caption
    ok = write_caps(tmp_path / "ok_caps.txt", ["sky sun", "sea"])
    assert read_captions(ok) == ["sky sun", "sea"]


def test_real_corel5k_vocabulary_matches_authors_file():
    if not REAL_DATA.is_dir():
        pytest.skip(f"real Corel 5K captions not present at {REAL_DATA}")
    assert len(read_captions(str(REAL_DATA / "train_caps.txt"))) == 4493   # docs/METHOD.md section 1: split sizes
    assert len(read_captions(str(REAL_DATA / "dev_caps.txt"))) == 499
    vocab = build_vocab([str(REAL_DATA / "train_caps.txt"), str(REAL_DATA / "dev_caps.txt")], threshold=2)
    with open(REAL_DATA / "corel5k_precomp_vocab.json", encoding="utf-8") as f:
        authors = json.load(f)
    assert len(vocab) == 264 and authors["idx"] == 264
    assert list(vocab.word2idx.items()) == list(authors["word2idx"].items())
    assert vocab.to_json()["idx2word"] == authors["idx2word"]
    loaded = load_vocab(str(REAL_DATA / "corel5k_precomp_vocab.json"))
    assert loaded.idx2word == vocab.idx2word


def test_one_caption_per_newline_line(tmp_path):
    # docs/METHOD.md section 1: one caption per line. Only newlines (\n, \r\n, \r) end a line, as when the authors'
    # loader iterates the file; other Unicode separators inside a caption must not split it, or the
    # captions stop lining up with the feature rows.
    path = tmp_path / "train_caps.txt"
    path.write_bytes("sky sun\u2028clouds\r\nsea\x0cwaves\nbeach \x85tree\nbird\n".encode("utf-8"))
    with open(path, encoding="utf-8") as f:
        expected = [line.rstrip("\r\n") for line in f]
    assert len(expected) == 4
    assert read_captions(str(path)) == expected
