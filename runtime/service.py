"""The runtime a robotics pipeline embeds: predict from raw sensor arrays, hot-swap packs live.

Thread model: the serving pack is one reference. ``predict`` reads it once at its start and uses
only that pack to the end, so a request never mixes two packs; ``swap`` validates and warms the
new pack first (in the caller's thread, or the watcher's) and then replaces the reference under a
lock. onnxruntime sessions are safe to call from several threads at once.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.backbones import BackboneSet
from mmcl_edge.runtime.errors import InputError, PackRejected, RuntimeUserError
from mmcl_edge.runtime.pack import CURRENT_FILE, Pack, load_pack

# raw sample dimensions per kind: a sample has this many axes, a batch one more
SAMPLE_NDIM = {"audio": 1, "vector": 1, "timeseries": 2, "image": 2}


@dataclass
class Prediction:
    labels: list[str]              # label name per sample
    indices: np.ndarray            # [B] class index into the pack's class list
    scores: np.ndarray             # [B] softmax probability of the predicted class
    probabilities: np.ndarray      # [B, C]
    pack_version: int              # the one pack that produced every number here
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess, backbone, pack, total


@dataclass
class Rejection:
    pack: str
    reason: str
    at: float


class Runtime:
    """Backbones loaded once from ``WS/backbones``; packs from ``WS/packs`` swapped in live."""

    def __init__(self, workspace, providers: list[str] | str | None = None, threads: int = 0,
                 pack: str | Path | None = None, use_tensorrt_engine: bool = True):
        self.root = Path(workspace).expanduser().resolve()
        self.providers = prov.choose(providers)
        self.threads = threads
        self.backbones = BackboneSet(self.root / "backbones", self.providers, threads, use_tensorrt_engine)
        self._lock = threading.Lock()
        self._pack: Pack | None = None
        self.rejections: list[Rejection] = []
        self.swaps = 0                  # packs swapped in after the first one
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen_pointer: str | None = None
        target = pack if pack is not None else self._pointer()
        if target is None:
            raise RuntimeUserError(f"{self.root} has no pack yet; learn a task first ('mmcl-edge learn')")
        self.swap(target)

    # packs ----------------------------------------------------------------------------------
    def _pointer(self) -> str | None:
        path = self.root / CURRENT_FILE
        return path.read_text().strip() if path.is_file() else None

    def _resolve(self, pack: str | Path) -> Path:
        p = Path(pack)
        return p if p.is_absolute() or p.exists() else self.root / "packs" / str(pack)

    @property
    def pack(self) -> Pack:
        return self._pack

    def swap(self, pack: str | Path) -> Pack:
        """Validate + warm ``pack`` (a folder or a name under WS/packs), then serve it.

        Raises ``PackRejected`` (and records it in ``rejections``) if any check fails; the pack
        that was serving keeps serving.
        """
        folder = self._resolve(pack)
        try:
            new = load_pack(folder, self.backbones.index, self.providers, self.threads)
        except PackRejected as exc:
            self.rejections.append(Rejection(str(folder), str(exc), time.time()))
            raise
        with self._lock:
            self.swaps += self._pack is not None
            self._pack = new
        return new

    def swap_in_background(self, pack: str | Path) -> Future:
        """``swap`` on a background thread; the Future holds the new Pack or the PackRejected."""
        future: Future = Future()

        def work():
            try:
                future.set_result(self.swap(pack))
            except BaseException as exc:  # handed to the caller through the Future
                future.set_exception(exc)

        threading.Thread(target=work, name="mmcl-pack-swap", daemon=True).start()
        return future

    def start_watcher(self, poll_seconds: float = 0.5) -> None:
        """Follow ``WS/current`` in a background thread and swap to each new pack it names."""
        if self._watcher is not None:
            return
        self._seen_pointer = self._pointer()
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, args=(poll_seconds,), name="mmcl-pack-watcher",
                                         daemon=True)
        self._watcher.start()

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            name = self._pointer()
            if name and name != self._seen_pointer:
                self._seen_pointer = name  # a rejected pack is not retried until the pointer moves
                try:
                    self.swap(name)
                except PackRejected:
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # inference ------------------------------------------------------------------------------
    def _as_batch(self, inputs: dict) -> tuple[dict[str, list], bool]:
        mods = self.backbones.modalities
        unknown = sorted(set(inputs) - set(mods))
        missing = [m for m in mods if m not in inputs]
        if unknown or missing:
            raise InputError(f"inputs must be exactly the modalities {mods}; "
                             + (f"missing {missing} " if missing else "") + (f"unknown {unknown}" if unknown else ""))
        batches, single = {}, None
        for m in mods:
            x, kind = inputs[m], self.backbones.specs[m].kind
            if isinstance(x, (list, tuple)):
                batches[m], is_single = [np.asarray(s) for s in x], False
            else:
                x = np.asarray(x)
                base = SAMPLE_NDIM[kind]
                is_single = x.ndim == base or (kind == "image" and x.ndim == 3 and x.shape[-1] in (1, 3, 4))
                if not is_single and x.ndim != base + 1 and not (kind == "image" and x.ndim == 4):
                    raise InputError(f"{m} ({kind}): expected one sample with {base} axes or a batch with "
                                     f"{base + 1}, got shape {x.shape}")
                batches[m] = [x] if is_single else list(x)
            single = is_single if single is None else single and is_single
        sizes = {m: len(b) for m, b in batches.items()}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise InputError(f"every modality needs the same, non-zero number of samples; got {sizes}")
        return batches, bool(single)

    def predict(self, inputs: dict) -> Prediction:
        """``{modality: sample or batch}`` -> labels, scores and per-stage timings (one pack)."""
        pack = self._pack                       # the one pack this request uses, start to end
        t0 = time.perf_counter()
        batches, _ = self._as_batch(inputs)
        try:
            pre = {m: self.backbones.preprocess(m, b) for m, b in batches.items()}
        except (ValueError, TypeError, IndexError) as exc:
            raise InputError(f"an input could not be preprocessed: {exc}") from None
        t1 = time.perf_counter()
        taps: dict[str, np.ndarray] = {}
        for m, x in pre.items():
            taps.update(self.backbones.run(m, x))
        t2 = time.perf_counter()
        logits, _ = pack.run(taps)
        t3 = time.perf_counter()
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        idx = probs.argmax(axis=1)
        return Prediction([pack.label_names[i] for i in idx], idx, probs[np.arange(len(idx)), idx], probs,
                          pack.version, {"preprocess": 1e3 * (t1 - t0), "backbone": 1e3 * (t2 - t1),
                                         "pack": 1e3 * (t3 - t2), "total": 1e3 * (t3 - t0)})

    def predict_taps(self, taps: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
        """Logits from precomputed taps (``<modality>__<tap>`` arrays) and the pack version used."""
        pack = self._pack
        return pack.run(taps)[0], pack.version

    def info(self) -> dict:
        pack = self._pack
        return {"workspace": str(self.root), "providers": self.providers,
                "available_providers": prov.available(), "backbones": self.backbones.backends,
                "pack": {"version": pack.version, "task": pack.manifest["task"], "folder": str(pack.folder),
                         "classes": pack.label_names}}
