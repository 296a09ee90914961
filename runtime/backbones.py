"""The exported backbones of a workspace, loaded once per runtime and never by a swap."""
from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mmcl_edge.preprocess import PreprocessSpec, preprocess_batch
from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.errors import InputError, RuntimeUserError
from mmcl_edge.runtime.pack import sha256_file
from mmcl_edge.threads import cpu_count, env_choice, serve_threads

INDEX_FILE = "backbones.json"

# Lanes: on a CPU with several cores, backbones of like cost run faster side by side, each on one
# thread (lane threads and, last, the request's own), than one after the other on every core: no
# thread pool wakes or spins between operators, and the next modality's numpy preprocessing overlaps
# the running backbones (AV-Digits, 2 cores, batch 1: 2.5 vs 4.0 ms end to end; beside a busy core
# p99 4.7 vs 5.9 ms; 4 request threads: 433 vs 403 requests/s). A backbone that outweighs the rest
# would lose the cores it splits its work over (UTD-MHAD's depth network, 94% of the time, alone on
# one thread: 10.0 vs 7.8 ms), so when the slowest backbone, timed once at load on one thread, takes
# more than LANE_BALANCE of the total it keeps every core and runs last, in the request's thread,
# while the others run in lanes beside its preprocessing (UTD-MHAD: 7.2 vs 7.7 ms).
LANES_ENV = "MMCL_EDGE_SERVE_LANES"
LANE_SETTINGS = {"auto": "auto", "on": "on", "off": "off"}
LANE_BALANCE = 0.6


def heavy_backbone(seconds: dict[str, float]) -> str | None:
    """The backbone that keeps every core (timed on one thread: ``seconds``), or None when they are
    balanced enough to run each on one thread."""
    slowest = max(seconds, key=seconds.get)
    return slowest if seconds[slowest] > LANE_BALANCE * sum(seconds.values()) else None


def lanes_setting() -> str:
    return env_choice(LANES_ENV, LANE_SETTINGS, "auto")


class BackboneSet:
    """One session (ONNX Runtime, or a TensorRT engine when one exists and tensorrt imports) per modality."""

    def __init__(self, folder: Path, providers: list[str], threads: int = 0, use_tensorrt_engine: bool = True):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.is_file():
            raise RuntimeUserError(f"no exported backbones in {self.folder}; run 'mmcl-edge export' "
                                   "(or learn a task) first")
        self.index = json.loads(index_path.read_text())["modalities"]
        self.specs = {m: self._spec(m, e) for m, e in self.index.items()}
        self.backends: dict[str, str] = {}
        self._runners = {}
        engines = {}
        for m, e in self.index.items():
            path = self.folder / e["file"]
            if not path.is_file() or sha256_file(path) != e["sha256"]:
                raise RuntimeUserError(f"backbone {path} is missing or does not match its sha256 "
                                       "in backbones.json; re-export with 'mmcl-edge export --force'")
            engine = self.folder / e.get("tensorrt", {}).get("file", "\0")
            if use_tensorrt_engine and e.get("tensorrt") and engine.is_file():
                from mmcl_edge.runtime.tensorrt_backend import TensorRTEngine, tensorrt_available

                if tensorrt_available()[0]:
                    engines[m] = TensorRTEngine(engine, [t["name"] for t in e["taps"]])
        setting = lanes_setting()
        # lanes are for CPU sessions whose threads nobody fixed: a GPU queues the work anyway
        self.lanes = (setting != "off" and len(self.index) > 1 and cpu_count() > 1 and not engines
                      and not serve_threads(threads) and prov.choose(providers)[0] == "CPUExecutionProvider")
        self.heavy: str | None = None  # in lanes, the backbone that keeps every core and runs last
        self._seconds: dict[str, float] = {}  # each backbone on one thread, timed at load (lanes, auto)
        if self.lanes:
            self._runners = {m: self._ort_runner(m, providers, 1) for m in self.index}
            seconds = self._one_thread_seconds() if setting == "auto" else None
            if seconds:
                self._seconds = seconds
                self.heavy = heavy_backbone(seconds)
                if self.heavy is not None:
                    self._runners[self.heavy] = self._ort_runner(self.heavy, providers, threads)
            else:
                self.lanes = setting == "on"
        for m in self.index:
            if m in engines:
                self._runners[m], self.backends[m] = engines[m], "tensorrt-engine"
            elif not self.lanes:
                self._runners[m] = self._ort_runner(m, providers, threads)
        # the request's thread is one lane; more lane threads than the other cores would only queue
        lane_threads = min(len(self.index), cpu_count()) - 1
        self._lane_pool = ThreadPoolExecutor(lane_threads, thread_name_prefix="mmcl-lane") if self.lanes else None

    def _ort_runner(self, modality: str, providers: list[str], threads: int) -> "_OrtRunner":
        e = self.index[modality]
        sess = prov.session(self.folder / e["file"], providers, threads)
        self.backends[modality] = "onnxruntime:" + sess.get_providers()[0]
        return _OrtRunner(sess, e["input"], [t["name"] for t in e["taps"]])

    def _one_thread_seconds(self) -> dict[str, float] | None:
        """Each backbone's time on one thread at batch 1 (best of 3 after a warm-up run); None when
        an input shape is not fixed. Tokenised texts are not: a request runs its texts' own length,
        not ``max_tokens`` (clothing-cil: reviews and titles timed alike at 128 tokens, then a review
        on one thread beside a five-token title took 17.6 ms a request, one after another 14.8)."""
        seconds = {}
        for m, e in self.index.items():
            shape = e.get("input_shape") or []
            spec = self.specs[m]
            if spec.kind == "text" and spec.encoding == "tokens":
                return None
            if not all(isinstance(d, int) and d > 0 for d in shape):
                return None
            x = np.zeros((1, *shape), np.float32)
            best = float("inf")
            for i in range(4):
                t0 = time.perf_counter()
                self._runners[m](x)
                if i:
                    best = min(best, time.perf_counter() - t0)
            seconds[m] = best
        return seconds

    def _spec(self, modality: str, entry: dict) -> PreprocessSpec:
        """The exported preprocessing; a text modality tokenises with the tokenizer exported beside its
        backbone (checked against its sha256), the very file the learner used."""
        spec = PreprocessSpec.from_dict(entry["preprocess"])
        if spec.kind != "text" or spec.encoding != "tokens":
            return spec
        tok = entry.get("tokenizer") or {}
        path = self.folder / tok.get("file", "\0")
        if not path.is_file() or sha256_file(path) != tok.get("sha256"):
            raise RuntimeUserError(f"the tokenizer of the text modality {modality!r} ({path}) is missing or does not "
                                   "match its sha256 in backbones.json; re-export with 'mmcl-edge export --force'")
        return dataclasses.replace(spec, options={**spec.options, "tokenizer_file": str(path)})

    @property
    def modalities(self) -> list[str]:
        return list(self.index)

    def preprocess(self, modality: str, samples) -> np.ndarray:
        return preprocess_batch(samples, self.specs[modality])

    def absent(self, modality: str, batch: int) -> dict[str, np.ndarray]:
        """What an absent modality feeds the pack: zero taps (the learner trains with the same)."""
        return {f"{modality}__{t['name']}": np.zeros((batch, t["tokens"], t["dim"]), np.float32)
                for t in self.index[modality]["taps"]}

    def run(self, modality: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed batch -> ``{"<modality>__<tap>": [B, tokens, dim]}``."""
        outs = self._runners[modality](batch)
        return {f"{modality}__{t['name']}": o for t, o in zip(self.index[modality]["taps"], outs)}

    def _preprocessed(self, modality: str, samples) -> np.ndarray:
        try:
            return self.preprocess(modality, samples)
        except (ValueError, TypeError, IndexError) as exc:
            raise InputError(f"an input could not be preprocessed: {exc}") from None

    def extract(self, batches: dict[str, list]) -> tuple[dict[str, np.ndarray], float]:
        """Raw samples per modality -> their taps, and the seconds spent preprocessing them.

        Preprocessing (numpy, mostly holding the GIL) stays in the calling thread; in lanes each
        backbone but the last is handed to a lane thread as soon as its input is ready, so it runs
        while the next modality is preprocessed, and the last (the heavy one, if any) runs in the
        calling thread. The calling thread takes the heavy backbone, else the slowest one: the lane
        threads may be fewer than the other modalities and then queue them (clothing-cil: its two
        text encoders in one lane, the shopper's vector network in the request's thread, took
        18.8 ms; the encoders side by side ~10)."""
        taps: dict[str, np.ndarray] = {}
        items = sorted(batches.items(), key=lambda item: (item[0] == self.heavy, self._seconds.get(item[0], 0.0)))
        lanes = self.lanes and len(items) > 1
        futures, seconds, error = [], 0.0, None
        try:
            for i, (m, samples) in enumerate(items):
                t0 = time.perf_counter()
                x = self._preprocessed(m, samples)
                seconds += time.perf_counter() - t0
                if lanes and i < len(items) - 1:
                    futures.append(self._lane_pool.submit(self.run, m, x))
                else:
                    taps.update(self.run(m, x))
        except Exception as exc:  # the lanes already started still finish before the error is raised
            error = exc
        for future in futures:
            try:
                taps.update(future.result())
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return taps, seconds


class _OrtRunner:
    def __init__(self, session, input_name: str, outputs: list[str]):
        self.session, self.input_name, self.outputs = session, input_name, outputs

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
