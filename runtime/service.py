"""The runtime a robotics pipeline embeds: predict from raw sensor arrays, hot-swap packs live.

Thread model: the serving pack is one reference. ``predict`` reads it once at its start and uses
only that pack to the end, so a request never mixes two packs; ``swap`` validates and warms the
new pack first (in the caller's thread, or the watcher's) and then replaces the reference under a
lock. onnxruntime sessions are safe to call from several threads at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmcl_edge.runtime import layout
from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime import validation
from mmcl_edge.runtime.backbones import BackboneSet
from mmcl_edge.runtime.errors import InputError, PackRejected, RuntimeUserError
from mmcl_edge.runtime.pack import Pack, PackPolicy, load_pack
from mmcl_edge.runtime.validation import SAMPLE_NDIM, Limits  # noqa: F401  (SAMPLE_NDIM: kept importable here)
from mmcl_edge.threads import limit_blas


# A pack's operators are too small to split across threads: waking a second thread for each costs
# more than it saves (AV-Digits, 2 cores, batch 1: 0.33 ms on one thread vs 0.40 ms on two; batch 8:
# 0.69 vs 0.89 ms). Backbones use the runtime's ``threads``.
PACK_THREADS = 1

# A swap is ~9 ms of CPU (verify, session, warm-up). Under request threads that keep the cores busy
# it competes with them at the same priority: requests slow down while it runs, and it takes twice
# its CPU time or more. A niceness for the thread that loads packs picks the side: positive, swaps
# yield to requests (AV-Digits, 4 request threads, 1,000 swaps: nice 10, request p99 during swaps
# 21.2 vs 25.9 ms, swaps 35 / 84 ms p50 / p99 vs 21 / 36); negative (needs CAP_SYS_NICE), swaps
# finish first (nice -10: 12.4 / 23.5 ms, requests 33.8 ms p99 meanwhile). Linux only: elsewhere a
# thread has no priority of its own.
SWAP_NICE_ENV = "MMCL_EDGE_SWAP_NICE"


def swap_nice_setting() -> int:
    raw = os.environ.get(SWAP_NICE_ENV, "0").strip() or "0"
    try:
        return int(raw)
    except ValueError:
        raise RuntimeUserError(f"{SWAP_NICE_ENV}={raw!r} is not a whole number (a niceness change, -20..19)") from None


def _nice_this_thread(change: int, failed: list) -> None:
    """The loader thread's initializer: its niceness moved by ``change`` (threads it starts inherit it)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + change)
    except OSError as exc:
        failed.append(exc)


@dataclass
class Prediction:
    labels: list[str]              # label name per sample
    indices: np.ndarray            # [B] class index into the pack's class list
    scores: np.ndarray             # [B] softmax probability of the predicted class
    probabilities: np.ndarray      # [B, C]
    pack_version: int              # the one pack that produced every number here
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess, backbone, pack, total
    modalities: list[str] = field(default_factory=list)         # the modalities this answer used
    novelty: np.ndarray | None = None  # [B] 1 - top probability: how unlike every learned class; None: old pack
    unknown: np.ndarray | None = None  # [B] bool: novelty above the pack's threshold ("teach me this")


@dataclass
class Rejection:
    pack: str
    reason: str
    at: float


class Runtime:
    """Backbones loaded once from ``WS/backbones``; packs from ``WS/packs`` swapped in live.

    Trust: ``trusted_keys`` (Ed25519 public keys: PEM paths, bytes or key objects) makes the
    runtime serve only packs signed by one of them, of this workspace (``workspace_id``, read from
    ``WS/workspace.json`` when not given, else pinned by the first pack), and never older than the
    serving one unless ``allow_downgrade``. Without keys packs are checked for integrity only.
    Bounds: ``warmup_seconds`` per pack warm-up; ``limits`` (``validation.Limits``) per request.
    Providers: ``providers`` for the backbones (best available by default); ``pack_providers``
    for packs ("cpu" by default: a pack is too small to gain from a GPU; None = best available).
    """

    def __init__(self, workspace, providers: list[str] | str | None = None, threads: int = 0,
                 pack: str | Path | None = None, use_tensorrt_engine: bool = True, *,
                 trusted_keys=None, allow_downgrade: bool = False, workspace_id: str | None = None,
                 warmup_seconds: float = 10.0, limits: Limits | None = None,
                 allowed_ops=PackPolicy.allowed_ops, pack_providers: list[str] | str | None = "cpu",
                 swap_nice: int | None = None):
        self.root = layout.resolve_root(workspace)
        self.blas_limited = limit_blas()  # numpy's BLAS on one thread, as the CLI sets it (mmcl_edge/threads.py)
        self.providers = prov.choose(providers)
        # A pack is ~170 tiny operators: on a GPU it is bound by kernel launches (H200: 1.0-1.75 ms
        # on CUDA vs 0.3 ms on its host CPU, benchmarks/README.md), so it runs on the CPU unless asked.
        self.pack_providers = prov.choose(pack_providers)
        self.threads = threads
        self.limits = limits or Limits()
        keys = []
        if trusted_keys:
            from mmcl_edge.runtime.trust import load_public_key

            keys = [load_public_key(k) for k in ([trusted_keys] if isinstance(trusted_keys, (str, Path, bytes))
                                                 else trusted_keys)]
        self.policy = PackPolicy(trusted_keys=keys, workspace_id=workspace_id or self._workspace_id(),
                                 allow_downgrade=allow_downgrade, allowed_ops=allowed_ops,
                                 warmup_seconds=warmup_seconds)
        self.backbones = BackboneSet(self.root / "backbones", self.providers, threads, use_tensorrt_engine)
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._pack: Pack | None = None
        self.rejections: list[Rejection] = []
        self.swaps = 0                  # packs swapped in after the first one
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen_pointer: str | None = None
        self.swap_nice = swap_nice_setting() if swap_nice is None else int(swap_nice)
        self._loader = self._start_loader() if self.swap_nice else None
        target = pack if pack is not None else self._pointer()
        if target is None:
            raise RuntimeUserError(f"{self.root} has no pack yet; learn a task first ('mmcl-edge learn')")
        self.swap(target)

    # packs ----------------------------------------------------------------------------------
    def _start_loader(self) -> ThreadPoolExecutor:
        """The thread that loads packs at niceness ``swap_nice`` relative to this one (see SWAP_NICE_ENV)."""
        if not sys.platform.startswith("linux"):
            raise RuntimeUserError("a swap priority (swap_nice, MMCL_EDGE_SWAP_NICE) needs Linux, where a thread "
                                   "has a niceness of its own")
        failed: list = []
        loader = ThreadPoolExecutor(1, thread_name_prefix="mmcl-pack-loader", initializer=_nice_this_thread,
                                    initargs=(self.swap_nice, failed))
        loader.submit(lambda: None).result()  # start it now: a niceness it may not take is an error here
        if failed:
            loader.shutdown()
            raise RuntimeUserError(f"cannot move the pack loader's niceness by {self.swap_nice} ({failed[0]}); "
                                   "raising a priority needs CAP_SYS_NICE or a higher RLIMIT_NICE") from None
        return loader

    def _workspace_id(self) -> str | None:
        try:
            return json.loads((self.root / layout.WORKSPACE_FILE).read_text()).get("workspace_id")
        except (OSError, ValueError, AttributeError):
            return None

    @property
    def authenticated(self) -> bool:
        """True when packs must be signed by a trusted key."""
        return bool(self.policy.trusted_keys)

    def _pointer(self) -> str | None:
        """The pack name in WS/current: ``vNNNN`` naming a folder directly inside WS/packs (else PackRejected)."""
        return layout.read_current(self.root)

    def _resolve(self, pack: str | Path) -> Path:
        p = Path(pack)
        if isinstance(pack, str) and layout.PACK_NAME.match(pack):
            return self.root / layout.PACKS_DIR / pack
        return p if p.is_absolute() or p.exists() else self.root / layout.PACKS_DIR / str(pack)

    @property
    def pack(self) -> Pack:
        return self._pack

    def swap(self, pack: str | Path) -> Pack:
        """Validate + warm ``pack`` (a folder or a name under WS/packs), then serve it.

        Raises ``PackRejected`` (and records it in ``rejections``) if any check fails; the pack
        that was serving keeps serving.
        """
        folder = self._resolve(pack)
        with self._swap_lock:  # one validation at a time: the downgrade check sees the serving version
            serving = self._pack
            policy = dataclasses.replace(self.policy, min_version=serving.version if serving else None)
            try:
                args = (folder, self.backbones.index, self.pack_providers, PACK_THREADS, policy)
                new = load_pack(*args) if self._loader is None else self._loader.submit(load_pack, *args).result()
            except PackRejected as exc:
                self.rejections.append(Rejection(str(folder), str(exc), time.time()))
                raise
            if self.policy.workspace_id is None and new.manifest.get("workspace_id"):
                self.policy.workspace_id = new.manifest["workspace_id"]  # pinned by the first pack
            t0 = time.perf_counter()
            with self._lock:
                self.swaps += self._pack is not None
                self._pack = new
            new.load_ms["switch"] = 1e3 * (time.perf_counter() - t0)
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
        try:
            self._seen_pointer = (self.root / layout.CURRENT_FILE).read_text().strip()
        except (OSError, UnicodeDecodeError):
            self._seen_pointer = None
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, args=(poll_seconds,), name="mmcl-pack-watcher",
                                         daemon=True)
        self._watcher.start()

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                raw = (self.root / layout.CURRENT_FILE).read_text().strip()
            except (OSError, UnicodeDecodeError):
                continue
            if raw and raw != self._seen_pointer:
                self._seen_pointer = raw  # a rejected pack is not retried until the pointer moves
                try:
                    self.swap(layout.check_pack_name(raw))
                except PackRejected as exc:
                    if not self.rejections or self.rejections[-1].reason != str(exc):
                        self.rejections.append(Rejection(raw[:200], str(exc), time.time()))
                except Exception as exc:  # the watcher must outlive anything a pack can do
                    self.rejections.append(Rejection(raw[:200], f"swap failed: {exc!r}", time.time()))

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the watcher; returns True when its thread has ended.

        The watcher wakes at once; a swap it is validating finishes first (its warm-up is bounded
        by ``warmup_seconds``), so the default wait is that budget plus a margin.
        """
        self._stop.set()
        watcher = self._watcher
        if watcher is not None:
            watcher.join(timeout=self.policy.warmup_seconds + 30 if timeout is None else timeout)
            if watcher.is_alive():
                return False
            self._watcher = None
        return True

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # inference ------------------------------------------------------------------------------
    def _as_batch(self, inputs: dict, pack: Pack) -> tuple[dict[str, list], bool]:
        """``{modality: sample or batch}`` -> lists of samples. A modality may be left out (a sensor
        that dropped out) when the pack handles absent modalities; at least one must be given."""
        validation.check_container(inputs)
        mods = self.backbones.modalities
        unknown = sorted(set(inputs) - set(mods))
        given = [m for m in mods if m in inputs and inputs[m] is not None]
        if unknown or not given:
            raise InputError(f"inputs must name some of the modalities {mods}; "
                             + (f"unknown {unknown}" if unknown else "none was given"))
        if len(given) < len(mods) and not pack.handles_missing:
            raise InputError(f"pack v{pack.version:04d} needs every modality {mods} (missing "
                             f"{[m for m in mods if m not in given]}); packs made since mmcl-edge 0.2 accept absent ones")
        batches, single = {}, None
        for m in given:
            x, kind = inputs[m], self.backbones.specs[m].kind
            batches[m], is_single = validation.split(m, kind, x)  # layouts, dtypes, None: runtime/validation.py
            validation.check_batch(m, kind, batches[m], self.backbones.specs[m], self.limits)
            single = is_single if single is None else single and is_single
        sizes = {m: len(b) for m, b in batches.items()}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise InputError(f"every modality needs the same, non-zero number of samples; got {sizes}")
        return batches, bool(single)

    def validate(self, inputs: dict) -> dict[str, list[np.ndarray]]:
        """The checks ``predict`` makes of a request, without predicting: ``{modality: [samples]}``
        for the modalities given (what the service's inbox stores of a labelled request)."""
        pack = self.pack
        if pack is None:
            raise InputError("no pack is serving yet")
        return self._as_batch(inputs, pack)[0]

    def predict(self, inputs: dict) -> Prediction:
        """``{modality: sample or batch}`` -> labels, scores and per-stage timings (one pack).

        Only the given modalities' backbones run; an absent modality's taps are zeros and the pack
        is told it is absent (``Prediction.modalities`` lists what was used).
        """
        pack = self._pack                       # the one pack this request uses, start to end
        t0 = time.perf_counter()
        batches, _ = self._as_batch(inputs, pack)
        t1 = time.perf_counter()
        taps, preprocess_s = self.backbones.extract(batches)
        t1 += preprocess_s  # preprocessing counts from the start, the backbone stage is the rest
        batch = len(next(iter(batches.values())))
        for m in self.backbones.modalities:
            if m not in batches:
                taps.update(self.backbones.absent(m, batch))
        present = np.array([[float(m in batches) for m in pack.modalities]], np.float32).repeat(batch, axis=0)
        t2 = time.perf_counter()
        logits, _ = pack.run(taps, present)
        t3 = time.perf_counter()
        if not np.isfinite(logits).all():
            bad = int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])
            raise RuntimeUserError(f"pack v{pack.version:04d} gave non-finite scores for sample {bad}; "
                                   "nothing is answered for this request")
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        idx = probs.argmax(axis=1)
        top = probs[np.arange(len(idx)), idx]
        threshold = pack.novelty_threshold
        novelty = None if threshold is None else (1.0 - top).astype(np.float32)
        unknown = None if threshold is None else novelty > threshold
        return Prediction([pack.label_names[i] for i in idx], idx, top, probs,
                          pack.version, {"preprocess": 1e3 * (t1 - t0), "backbone": 1e3 * (t2 - t1),
                                         "pack": 1e3 * (t3 - t2), "total": 1e3 * (t3 - t0)}, list(batches),
                          novelty, unknown)

    def predict_taps(self, taps: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
        """Logits from precomputed taps (``<modality>__<tap>`` arrays) and the pack version used."""
        pack = self._pack
        return pack.run(taps)[0], pack.version

    def info(self) -> dict:
        pack = self._pack
        return {"workspace": str(self.root), "providers": self.providers, "pack_providers": self.pack_providers,
                "available_providers": prov.available(), "backbones": self.backbones.backends,
                "lanes": self.backbones.lanes,
                "pack": {"version": pack.version, "task": pack.manifest["task"], "folder": str(pack.folder),
                         "classes": pack.label_names},
                "authenticated": self.authenticated, "workspace_id": self.policy.workspace_id,
                "limits": dataclasses.asdict(self.limits)}
