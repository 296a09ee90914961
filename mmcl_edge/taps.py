"""Backbone choice per modality and the on-disk tap cache.

Taps are computed once per sample and stored under a key of (modality, backbone identity,
preprocessing digest); inside it each sample is keyed by a hash of its raw bytes. Learning a task
then reads taps from the cache and trains only the adapters: no backbone in the training loop.
"""
from __future__ import annotations

import hashlib
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmcl_edge.backbones import BACKBONES, TappedBackbone, create_backbone
from mmcl_edge.preprocess import PreprocessSpec, preprocess, preprocess_batch
from mmcl_edge import text
from mmcl_edge.runtime import layout, memory

# (kind, encoding) -> the frozen backbone used unless modalities.json names another ("backbone")
DEFAULT_BACKBONES = {("image", "cnn"): "efficientnet-lite0", ("audio", "cnn"): "efficientnet-lite0",
                     ("timeseries", "spectrogram"): "efficientnet-lite0", ("timeseries", "rocket"): "rocket",
                     ("video", "cnn"): "efficientnet-lite0-video", ("vector", "identity"): "identity",
                     ("text", "tokens"): "minilm-l6"}


def backbone_for(spec: PreprocessSpec, example: np.ndarray | None, name: str | None = None,
                 shape: tuple[int, ...] | None = None) -> TappedBackbone:
    """The frozen backbone of a modality: the default of its kind and encoding, or a registered name.

    Backbones get the input geometry they ask for (by parameter name), read off the spec and one
    preprocessed example (or its ``shape``, as a workspace remembers it): ``image_size``, ``frames``,
    ``channels``/``length`` (series), ``input_shape``, ``dim`` and ``max_tokens`` (text).
    """
    if spec.encoding == "raw":
        name = "raw"
    name = name or spec.options.get("backbone") or DEFAULT_BACKBONES[(spec.kind, spec.encoding)]
    factory = BACKBONES.get(name)
    if factory is None:
        return create_backbone(name)  # the registry's own "unknown backbone" error
    shape = tuple(shape) if shape is not None else preprocess(example, spec).shape
    offered = {"image_size": spec.image_size, "frames": spec.frames, "input_shape": shape,
               "dim": int(np.prod(shape)), "channels": shape[0], "length": shape[-1],
               "max_tokens": spec.options.get("max_tokens")}
    wanted = inspect.signature(factory).parameters
    return create_backbone(name, **{k: v for k, v in offered.items() if k in wanted})


_KEY_BYTES = 20  # a sha1 digest
EXTRACT_BATCH_ELEMENTS = 8 * 3 * 96 * 96  # input elements per forward pass during tap extraction
# A text encoder's attention grows with the square of the batch's length: batch x tokens^2 is held to
# 8 texts of 256 tokens per forward pass (clothing-cil, 64 texts a batch: learn's peak 977-1,211 MB
# a task, the attention of the longest reviews; short texts still go 64 at a time)
EXTRACT_BATCH_TOKENS_SQUARED = 8 * 256 * 256


def extraction_batches(samples: list, spec: PreprocessSpec, input_shape, batch_size: int = 64):
    """``(count, preprocessed batch)`` for each forward pass of tap extraction, in order.

    The activations of a pass are the learner's peak, so a pass holds about 8 images' worth of
    input elements (AV images: +290 MB at 64, +109 MB at 16, +74 MB at 8; 320 images in 2.5 s at
    16, 2.9 s at 8, 4.1 s at 4 on 2 cores); tokenised texts are tokenised at once, then cut into
    passes of at most EXTRACT_BATCH_TOKENS_SQUARED (batch x its longest text's tokens squared)."""
    if spec.kind == "text" and spec.encoding == "tokens":
        memory.map_large_allocations()  # each pass's shapes differ: activations in their own mappings
        ids = text.token_ids(samples, spec.options["max_tokens"], spec.options.get("tokenizer_file"))
        lengths = ids[:, 1].sum(axis=1)
        b = 0
        while b < len(ids):
            longest = max(2.0, float(lengths[b:b + batch_size].max()))
            n = max(1, min(batch_size, int(EXTRACT_BATCH_TOKENS_SQUARED // longest ** 2)))
            chunk = ids[b:b + n]
            yield len(chunk), text.trim_padding(chunk)
            b += n
        return
    per_sample = int(np.prod(input_shape)) if input_shape else 1
    n = max(1, min(batch_size, EXTRACT_BATCH_ELEMENTS // max(1, per_sample)))
    for b in range(0, len(samples), n):
        chunk = samples[b:b + n]
        yield len(chunk), preprocess_batch(chunk, spec)


def sample_key(x: np.ndarray) -> bytes:
    a = np.ascontiguousarray(x)
    return hashlib.sha1(f"{a.dtype}{a.shape}".encode() + a.tobytes()).digest()


def _shards(folder: Path) -> list[Path]:
    """Finished shards only: a ``.tmp.npz`` still being written also matches ``shard_*.npz``."""
    return sorted(p for p in folder.glob("shard_*.npz") if not p.name.endswith(".tmp.npz"))


@dataclass
class ExtractStats:
    requested: int = 0
    extracted: int = 0
    seconds: float = 0.0


class TapCache:
    """A folder of ``.npz`` shards per (modality, backbone, preprocessing).

    Only the shards' sample keys stay in memory; a request's taps are read shard by shard. (The
    taps of every task so far, held merged in memory and copied whole at every extraction, were
    most of a learner's memory at tap extraction, and grew with each task.)
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._index: dict[Path, dict[bytes, tuple[int, int]]] = {}  # sample key -> (shard, row)

    def _folder(self, modality: str, backbone: TappedBackbone, spec: PreprocessSpec) -> Path:
        return self.root / f"{modality}-{backbone.name}-{backbone.identity()}-{spec.digest()}"

    def _load(self, folder: Path) -> dict[bytes, tuple[int, int]]:
        if folder not in self._index:
            index: dict[bytes, tuple[int, int]] = {}
            for s, shard in enumerate(_shards(folder)):
                with np.load(shard) as z:
                    keys = z["keys"]  # an npz member is read when asked for: the taps stay on disk
                for i, k in enumerate(keys):
                    # numpy's "S" dtype drops trailing NUL bytes; a digest may end in them.
                    index.setdefault(bytes(k).ljust(_KEY_BYTES, b"\0"), (s, i))
            self._index[folder] = index
        return self._index[folder]

    def get(self, modality: str, samples: list[np.ndarray], spec: PreprocessSpec, backbone: TappedBackbone,
            batch_size: int = 64, progress: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], ExtractStats]:
        """Taps ``[N, tokens, dim]`` (one array per tap) for ``samples``; extracts only what is missing."""
        start = time.perf_counter()
        folder = self._folder(modality, backbone, spec)
        index = self._load(folder)
        keys = [sample_key(s) for s in samples]
        missing = list(dict.fromkeys(k for k in keys if k not in index))
        stats = ExtractStats(requested=len(samples), extracted=len(missing))
        fresh: tuple[int, list[np.ndarray]] | None = None  # the shard just written, still in memory
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            if spec.kind == "text":  # texts of similar length share a batch: less padding to encode
                missing.sort(key=lambda k: len(text.as_text(samples[first[k]])))
            todo = [samples[first[k]] for k in missing]
            new = [[] for _ in backbone.taps]
            with torch.inference_mode():
                for count, x in extraction_batches(todo, spec, backbone.input_shape, batch_size):
                    for i, t in enumerate(backbone(torch.from_numpy(x))):
                        new[i].append(t.float().numpy())
                    if progress:
                        progress(count)
            new_arrays = [np.concatenate(n) for n in new]
            del new
            folder.mkdir(parents=True, exist_ok=True)
            number = len(_shards(folder))
            shard = folder / f"shard_{number:05d}.npz"
            content = {"keys": np.array(missing, dtype=f"S{_KEY_BYTES}"), **{f"tap{i}": a for i, a in enumerate(new_arrays)}}

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    np.savez(f, **content)

            # a reader never sees a half-written shard; a full disk leaves no temporary and names the shard
            layout.atomic_write(shard, write)
            for i, k in enumerate(missing):
                index[k] = (number, i)
            fresh = (number, new_arrays)
        out = None
        where = np.array([index[k] for k in keys], dtype=int).reshape(len(keys), 2)
        shards = _shards(folder)
        for s in np.unique(where[:, 0]):
            pos = np.flatnonzero(where[:, 0] == s)
            if fresh is not None and s == fresh[0]:
                arrays = fresh[1]
            else:
                with np.load(shards[s]) as z:
                    arrays = [z[f"tap{i}"] for i in range(len(z.files) - 1)]
            if out is None:
                out = [np.empty((len(keys), *a.shape[1:]), a.dtype) for a in arrays]
            for o, a in zip(out, arrays):
                o[pos] = a[where[pos, 1]]
            del arrays
        if out is None:  # no sample asked for
            out = [np.zeros((0, t.tokens, t.dim), np.float32) for t in backbone.taps]
        stats.seconds = time.perf_counter() - start
        return out, stats
