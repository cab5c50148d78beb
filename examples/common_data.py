"""Dataset loading and command line shared by the examples (framework-neutral: numpy arrays only).

    training_parser(...) / finish_args(p, argv)
                                   the options every example takes, and their per-task defaults

    digits(seed)                   scikit-learn's bundled 8x8 digit images, a fixed train/test split
    epoch_shard(n, rank, size, seed, epoch)
                                   this rank's sample indices for one epoch (same count on every rank)
    Corpus(path, max_vocab)        a word-level corpus: vocabulary from the training file
    Corpus.encode(path)            token ids of a text file (unknown words -> <unk>)
    shard_tokens / batchify        split a token stream over ranks, then into batch_size rows

Randomness comes from numpy Generators built from (seed, epoch): every rank and every run with the
same arguments sees the same order, so a run resumed from a checkpoint continues exactly.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LM_TRAIN = os.path.join(REPO, "..", "shared", "data", "wikitext2-valid.txt")
DEFAULT_LM_TEST = os.path.join(REPO, "..", "shared", "data", "wikitext2-test.txt")


def training_parser(description, *, backends, max_vocab, threads_help, checkpoint_help):
    """The options both training examples take; each adds its framework's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--task", choices=("digits", "lm"), default="digits")
    p.add_argument("--data", default=None, help="lm: training text (default ../shared/data/wikitext2-valid.txt)")
    p.add_argument("--eval-data", default=None, help="lm: evaluation text (default wikitext2-test.txt)")
    p.add_argument("--epochs", type=int, default=None, help="default 5 (digits) / 1 (lm)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank; default 32 (digits) / 16 (lm)")
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (digits, SGD) / 0.003 (lm, Adam)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (digits)")
    p.add_argument("--compressor", default=None, help="spec, e.g. topk:ratio=0.01 (default GRADCOMP_COMPRESSOR)")
    p.add_argument("--memory", default=None, help="error feedback spec (default GRADCOMP_MEMORY / auto)")
    p.add_argument("--sync", default=None, help="sync policy spec, e.g. localsgd:period=4 (default GRADCOMP_SYNC)")
    p.add_argument("--backend", default=None, help=f"{backends} (default GRADCOMP_BACKEND)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (simulate a crash)")
    p.add_argument("--max-vocab", type=int, default=max_vocab, help="lm: vocabulary size (the rest is <unk>)")
    p.add_argument("--bptt", type=int, default=35, help="lm: sequence length")
    p.add_argument("--emsize", type=int, default=64)
    p.add_argument("--nhid", type=int, default=128)
    p.add_argument("--clip", type=float, default=0.25, help="lm: gradient norm clipping")
    p.add_argument("--threads", type=int, default=0, help=threads_help)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="rank 0 prints a final RESULT {json} line")
    return p


def finish_args(p, argv=None):
    """Parse, fill the per-task defaults, and reject impossible settings with the parser's error."""
    a = p.parse_args(argv)
    lm = a.task == "lm"
    a.epochs = a.epochs if a.epochs is not None else (1 if lm else 5)
    a.batch_size = a.batch_size if a.batch_size is not None else (16 if lm else 32)
    a.lr = a.lr if a.lr is not None else (0.003 if lm else 0.05)
    a.data = a.data or DEFAULT_LM_TRAIN
    a.eval_data = a.eval_data or DEFAULT_LM_TEST
    if a.epochs < 1 or a.batch_size < 1 or not a.lr > 0:
        p.error("--epochs and --batch-size must be >= 1 and --lr > 0")
    if a.resume and not a.checkpoint:
        p.error("--resume needs --checkpoint")
    return a


def digits(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 8, 8) in [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from e
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def epoch_shard(n: int, rank: int, size: int, seed: int, epoch: int) -> np.ndarray:
    """Indices of this rank's samples for `epoch`: a shared shuffle, dealt round-robin, truncated so
    every rank gets n // size samples (the ranks must take the same number of steps)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    per = n // size
    if per == 0:
        raise ValueError(f"{n} samples cannot be shared by {size} ranks")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank::size][:per]


def batches(indices: np.ndarray, batch_size: int):
    """Consecutive slices of `indices` of batch_size (the last one may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def _words(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file {path!r} not found; pass --data PATH (WikiText-2 lives in "
                                "../shared/data/ relative to the repository root)")
    with open(path, encoding="utf-8") as f:
        for line in f:
            toks = line.split()
            if toks:
                yield from toks
                yield "<eos>"


class Corpus:
    """Word-level vocabulary built from `train_path` (the max_vocab most frequent words)."""

    def __init__(self, train_path: str, max_vocab: int | None = None):
        counts = Counter(_words(train_path))
        if not counts:
            raise ValueError(f"{train_path!r} has no words")
        counts.pop("<unk>", None)
        counts.pop("<eos>", None)
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            if max_vocab < 3:
                raise ValueError(f"max_vocab={max_vocab} must be >= 3")
            words = words[:max_vocab - 2]
        self.itos = ["<unk>", "<eos>"] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.train_path = train_path

    def __len__(self):
        return len(self.itos)

    def encode(self, path: str) -> np.ndarray:
        unk = self.stoi["<unk>"]
        return np.fromiter((self.stoi.get(w, unk) for w in _words(path)), dtype=np.int64)


def shard_tokens(ids: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This rank's contiguous, equal-length part of a token stream."""
    per = len(ids) // size
    return ids[rank * per:(rank + 1) * per]


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """(batch_size, T) array: the stream cut into batch_size contiguous rows (the tail is dropped)."""
    t = len(ids) // batch_size
    if t < 2:
        raise ValueError(f"{len(ids)} tokens are too few for batch_size={batch_size}")
    return ids[:t * batch_size].reshape(batch_size, t)
