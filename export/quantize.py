"""Lower-precision backbones: INT8 (static, QDQ, calibrated on the workspace's own training
samples) and FP16, written beside the FP32 ONNX files and checked before they serve.

Packs are always learned on FP32 taps (the learner runs the PyTorch backbones). A lower-precision
backbone therefore serves only after ``change_precision`` measured the current pack on the test
split with FP32 taps and with the new taps and found the accuracy drop within the allowed one; its
identity gets a ``-int8`` / ``-fp16`` suffix, so a pack checked against one precision is never
served on another (the runtime rejects the identity mismatch). Packs that later tasks publish
carry the identity in the index: that export-time check is what licenses them.

Torch-free except ``change_precision``'s final step (re-publishing the pack needs the model).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcl_edge.errors import ConfigError, WorkspaceError
from mmcl_edge.preprocess import preprocess_batch
from mmcl_edge.runtime import layout
from mmcl_edge.runtime import providers as prov
from mmcl_edge.runtime.pack import sha256_file

PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_SAMPLES = 64      # spread across classes; ranges settle well before this (see tests)
CALIBRATION_BATCH = 8
EVAL_BATCH = 32
TIMING_WARMUP = 5
TIMING_REPEATS = 30
SEED = 0


# the index entry --------------------------------------------------------------------------------
def served_file(modality: str, precision: str) -> str:
    return f"{modality}.onnx" if precision == "fp32" else f"{modality}.{precision}.onnx"


def precision_identity(base: str, precision: str) -> str:
    """The identity packs are checked against: the FP32 one, suffixed for a lower precision."""
    return base if precision == "fp32" else f"{base}-{precision}"


def base_identity(entry: dict) -> str:
    """The FP32 backbone's identity (an index written before precisions existed has only ``identity``)."""
    return entry.get("base_identity", entry["identity"])


def entry_precision(entry: dict) -> str:
    return entry.get("precision", "fp32")


def fp32_file(entry: dict) -> str:
    return entry.get("fp32_file", entry["file"])


def with_precision(entry: dict, precision: str, file: str, sha: str, quantization: dict | None = None) -> dict:
    """``entry`` (any precision) re-pointed at ``file`` holding ``precision``."""
    e = {k: v for k, v in entry.items() if k not in ("quantization", "tensorrt")}  # an engine was built from another file
    base = base_identity(entry)
    e.update({"identity": precision_identity(base, precision), "base_identity": base, "precision": precision,
              "file": file, "sha256": sha, "fp32_file": fp32_file(entry),
              "fp32_sha256": entry.get("fp32_sha256", entry["sha256"]) if entry_precision(entry) != "fp32"
              else entry["sha256"]})
    if quantization:
        e["quantization"] = quantization
    return e


def check_precision(precision: str) -> str:
    p = precision.lower()
    if p not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return p


# conversion -------------------------------------------------------------------------------------
def spread_indices(y: np.ndarray, n: int, seed: int = SEED) -> np.ndarray:
    """Up to ``n`` indices of ``y``, taken class by class in turn (seeded), so every class is in."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    queues = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(int(q.pop()))
    return np.array(sorted(picked), dtype=np.int64)


def _topological(graph) -> None:
    """Sort ``graph``'s nodes so each comes after its inputs' producers (the FP16 converter
    appends the input casts at the end; onnx.checker wants them first)."""
    have = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in have for i in node.input):
                order.append(node)
                have.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or an undefined input")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def convert_fp16(src: Path, dst: Path) -> None:
    """Weights and compute in FP16, inputs and taps still FP32 (the runtime and packs are unchanged)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _topological(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


class _Batches:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over fixed batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int):
        self._it = iter([{input_name: np.ascontiguousarray(x[i:i + batch])} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, input_name: str,
                  batch: int = CALIBRATION_BATCH) -> None:
    """Static INT8, QDQ format: weights QInt8 per channel, activations QUInt8 (min/max on ``calibration``).

    QUInt8 activations (U8S8): on x86 onnxruntime they run the fast integer kernels; QInt8 ones
    (S8S8) ran no faster than FP32 here (EfficientNet-Lite0, AVX-512 VNNI), for the same accuracy.
    """
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Batches, CalibrationDataReader):
        pass

    dst = Path(dst)
    pre = dst.with_name(f"{dst.name}.pre")
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "consider pre-processing" and per-tensor notes are noise here
    try:
        source = str(src)
        # shape inference + graph optimisation lets more ops take the integer path; the symbolic
        # pass fails on some graphs (ROCKET's Concat), the plain ONNX one is then enough
        for symbolic_skip in (False, True):
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=symbolic_skip)
                source = str(pre)
                break
            except Exception:  # noqa: BLE001  (a pre-processing failure only costs speed)
                pre.unlink(missing_ok=True)
        quantize_static(source, str(dst), Reader(input_name, calibration, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        quiet.setLevel(level)
        pre.unlink(missing_ok=True)
        for p in Path(dst).parent.glob("*-augmented.onnx"):  # left by some onnxruntime versions
            p.unlink(missing_ok=True)
    import onnx

    onnx.checker.check_model(onnx.load(str(dst)))


# measurement ------------------------------------------------------------------------------------
def session(path: Path, threads: int = 0):
    return prov.session(path, ["CPUExecutionProvider"], threads)


def run_taps(sess, input_name: str, x: np.ndarray, batch: int = EVAL_BATCH) -> list[np.ndarray]:
    outs = [sess.run(None, {input_name: np.ascontiguousarray(x[i:i + batch])}) for i in range(0, len(x), batch)]
    return [np.concatenate(o) for o in zip(*outs)]


def tap_parity(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> dict:
    """Per tap: max abs difference and cosine similarity (per sample; mean and min) to the FP32 taps."""
    taps = {}
    for name, a, b in zip(names, ref, got):
        a = a.reshape(len(a), -1).astype(np.float64)
        b = b.reshape(len(b), -1).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        taps[name] = {"max_abs": float(np.abs(a - b).max()), "cosine": float(cos.mean()),
                      "cosine_min": float(cos.min())}
    return {"max_abs": max(t["max_abs"] for t in taps.values()),
            "cosine": min(t["cosine"] for t in taps.values()),
            "cosine_min": min(t["cosine_min"] for t in taps.values()), "taps": taps}


def time_sessions(sessions: dict[str, object], input_name: str, x1: np.ndarray,
                  repeats: int = TIMING_REPEATS, warmup: int = TIMING_WARMUP) -> dict[str, float]:
    """Median ms per call of each session on ``x1``; the sessions take turns, so a machine that
    gets busier part-way slows all of them alike."""
    feeds = {input_name: np.ascontiguousarray(x1)}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


# the workspace ----------------------------------------------------------------------------------
@dataclass
class PrecisionReport:
    precision: str
    previous: dict[str, str]          # modality -> precision served before
    modalities: dict[str, dict]       # modality -> the entry's "quantization" record
    accuracy: dict | None             # {"fp32": %, precision: %, "agreement": %, "samples": n}
    pack: str | None                  # the pack published for the new identities
    changed: bool


def _test_indices(sc, task: int) -> np.ndarray:
    return np.unique(np.concatenate([sc.tasks[k].test_idx for k in range(task + 1)])).astype(np.int64)


def _train_indices(sc, task: int | None) -> np.ndarray:
    if task is None:
        return np.arange(len(sc.train.y))
    return np.unique(np.concatenate([sc.tasks[k].train_idx for k in range(task + 1)])).astype(np.int64)


def change_precision(ws, precision: str, *, max_accuracy_drop: float = 1.0, force: bool = False,
                     threads: int = 0, calibration_samples: int = CALIBRATION_SAMPLES,
                     repeats: int = TIMING_REPEATS, log=None, modalities: list[str] | None = None) -> PrecisionReport:
    """Serve ``ws``'s backbones in ``precision``; call with the workspace lock held.

    For FP16/INT8: convert every FP32 backbone (INT8 calibrated on up to ``calibration_samples``
    training samples of the tasks learned so far, spread across classes), then measure on the test
    split of those tasks the current pack's accuracy on FP32 taps and on the new taps, the taps'
    parity and the ms per sample at batch 1. A drop beyond ``max_accuracy_drop`` points is refused
    (``WorkspaceError``) unless ``force``; refused or failed, nothing on disk changes. Accepted,
    the files are renamed into place, ``backbones.json`` is rewritten and the pack of the last
    learned task is re-published for the new identities. FP32 restores the exported files.

    ``modalities``: convert only these (the others keep the precision they serve in), e.g. UTD-MHAD's
    IMU and skeleton in INT8 with its depth network in FP32. The accuracy check is then of that mix,
    and with several converted, ``accuracy["alone"]`` gives the accuracy with each one alone
    converted: which modality a refusal comes from.
    """
    from mmcl_edge.export.backbone_export import read_index, write_index

    precision = check_precision(precision)
    say = log or (lambda _msg: None)
    folder = ws.root / "backbones"
    index = read_index(folder)
    entries = index["modalities"]
    if not entries:
        raise WorkspaceError(f"{folder} holds no exported backbones; run 'mmcl-edge export' first")
    previous = {m: entry_precision(e) for m, e in entries.items()}
    unknown = sorted(set(modalities or []) - set(entries))
    if unknown:
        raise ConfigError(f"no backbone for modality {', '.join(unknown)}; this workspace has {', '.join(entries)}")
    targets = [m for m in entries if not modalities or m in modalities]
    learned = ws.learned_tasks()
    task = learned - 1 if learned else None
    if all(previous[m] == precision for m in targets) and (not force or precision == "fp32"):
        return PrecisionReport(precision, previous, {m: e.get("quantization", {}) for m, e in entries.items()},
                               None, None, changed=False)
    for m, e in entries.items():
        if not (folder / fp32_file(e)).is_file():
            raise WorkspaceError(f"{folder / fp32_file(e)} (the FP32 {m} backbone) is missing; "
                                 "run 'mmcl-edge export --force'")

    pack_folder = layout.current_folder(ws.root) if task is not None else None
    if pack_folder is None and precision != "fp32" and not force:
        raise WorkspaceError(f"--precision {precision} checks the accuracy of the current pack, and {ws.root} "
                             "has none yet; learn a task first (or pass --force to convert unchecked)")

    tmp: dict[str, Path] = {}
    records: dict[str, dict] = {}
    accuracy = None
    try:
        if precision != "fp32":
            sc = ws.scenario()
            calib_idx = _train_indices(sc, task)
            calib_idx = calib_idx[spread_indices(sc.train.y[calib_idx], calibration_samples)]
            test_idx = _test_indices(sc, task) if task is not None else np.arange(min(len(sc.test.y), 64))
            ref_taps, new_taps = {}, {}
            for m, e in entries.items():
                spec = sc.specs[m]
                src = folder / fp32_file(e)
                if m not in targets:  # kept as it serves: its taps as served, against FP32 ones
                    if pack_folder is not None:
                        _served_taps(m, e, folder, sc, test_idx, threads, ref_taps, new_taps)
                    continue
                tmp[m] = layout.tmp_name(folder / served_file(m, precision))
                start = time.perf_counter()
                if precision == "int8":
                    say(f"quantising the {m} backbone to INT8 ({len(calib_idx)} calibration samples) ...")
                    calib = preprocess_batch([sc.train.samples[m][i] for i in calib_idx], spec)
                    quantize_int8(src, tmp[m], calib, e["input"])
                    del calib
                else:
                    say(f"converting the {m} backbone to FP16 ...")
                    convert_fp16(src, tmp[m])
                seconds = time.perf_counter() - start
                say(f"measuring the {m} backbone on {len(test_idx)} test samples ...")
                s32, sq = session(src, threads), session(tmp[m], threads)
                names = [t["name"] for t in e["taps"]]
                ref, new = [], []
                for b in range(0, len(test_idx), EVAL_BATCH):
                    x = preprocess_batch([sc.test.samples[m][i] for i in test_idx[b:b + EVAL_BATCH]], spec)
                    ref.append(s32.run(names, {e["input"]: x}))
                    new.append(sq.run(names, {e["input"]: x}))
                ref = [np.concatenate(o) for o in zip(*ref)]
                new = [np.concatenate(o) for o in zip(*new)]
                ref_taps.update({f"{m}__{n}": t for n, t in zip(names, ref)})
                new_taps.update({f"{m}__{n}": t for n, t in zip(names, new)})
                x1 = preprocess_batch([sc.test.samples[m][test_idx[0]]], spec)
                ms = time_sessions({"fp32": s32, precision: sq}, e["input"], x1, repeats)
                del s32, sq
                records[m] = {"precision": precision, "ms_fp32": round(ms["fp32"], 3),
                              f"ms_{precision}": round(ms[precision], 3),
                              "speedup": round(ms["fp32"] / ms[precision], 2), "batch": 1,
                              "threads": threads or None, "repeats": repeats,
                              "parity": {k: (round(v, 5) if isinstance(v, float) else
                                             {t: {a: round(b, 5) for a, b in d.items()} for t, d in v.items()})
                                         for k, v in tap_parity(ref, new, names).items()},
                              "convert_seconds": round(seconds, 2), "test_samples": int(len(test_idx))}
                if precision == "int8":
                    records[m]["calibration_samples"] = int(len(calib_idx))
            if pack_folder is not None:
                accuracy = pack_accuracy(pack_folder, entries, ref_taps, new_taps,
                                         np.array([sc.class_names[c] for c in sc.test.y[test_idx]]),
                                         precision, threads)
                if len(targets) > 1:  # each converted modality alone: where a loss comes from
                    accuracy["alone"] = {
                        m: pack_accuracy(pack_folder, entries,
                                         ref_taps, {k: (new_taps if k.startswith(f"{m}__") else ref_taps)[k]
                                                    for k in ref_taps},
                                         np.array([sc.class_names[c] for c in sc.test.y[test_idx]]),
                                         precision, threads)[precision] for m in targets}
                for r in records.values():
                    r["accuracy"] = accuracy
                drop = accuracy["fp32"] - accuracy[precision]
                if drop > max_accuracy_drop and not force:
                    hint = ""
                    alone = accuracy.get("alone") or {}
                    keep = [m for m in targets if accuracy["fp32"] - alone.get(m, accuracy["fp32"]) > max_accuracy_drop]
                    if keep and len(keep) < len(targets):
                        hint = ("; alone, " + ", ".join(f"{m} loses {accuracy['fp32'] - alone[m]:.2f}" for m in keep)
                                + ": keep it in FP32 with " + " ".join(f"--modality {m}" for m in targets if m not in keep))
                    raise WorkspaceError(
                        f"{precision.upper()} backbones lose {drop:.2f} accuracy points on the test split "
                        f"({accuracy['fp32']:.2f}% -> {accuracy[precision]:.2f}%), more than "
                        f"--max-accuracy-drop {max_accuracy_drop:g}; nothing was changed (--force accepts it){hint}")
        # commit: files into place, the index, then the pack for the new identities
        new_index = {**index, "modalities": {}}
        for m, e in entries.items():
            if m not in targets:
                new_index["modalities"][m] = e
            elif precision == "fp32":
                name = fp32_file(e)
                new_index["modalities"][m] = with_precision(e, "fp32", name, sha256_file(folder / name))
            else:
                name = served_file(m, precision)
                os.replace(tmp.pop(m), folder / name)
                new_index["modalities"][m] = with_precision(e, precision, name, sha256_file(folder / name), records[m])
        new_index["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_index(folder, new_index)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)

    published = None
    if task is not None:
        from mmcl_edge.export.pack_export import publish_pack

        try:
            published = publish_pack(ws, task, ws.load_model(task)).name
        except BaseException:
            write_index(folder, index)  # the served pack still matches the old identities
            raise
    for m in targets:  # files of a precision no longer served
        for p in PRECISIONS:
            if p not in ("fp32", precision):
                (folder / served_file(m, p)).unlink(missing_ok=True)
    return PrecisionReport(precision, previous, records, accuracy, published, changed=True)


def _served_taps(m: str, e: dict, folder: Path, sc, test_idx: np.ndarray, threads: int,
                 ref_taps: dict, new_taps: dict) -> None:
    """A modality left as it serves: its FP32 taps into ``ref_taps``, its served taps into ``new_taps``."""
    names = [t["name"] for t in e["taps"]]
    files = {"ref": fp32_file(e), "new": e["file"]}
    got = {}
    for which, name in files.items():
        if which == "new" and name == files["ref"]:
            got["new"] = got["ref"]
            continue
        sess = session(folder / name, threads)
        outs = [sess.run(names, {e["input"]: preprocess_batch([sc.test.samples[m][i] for i in test_idx[b:b + EVAL_BATCH]],
                                                              sc.specs[m])})
                for b in range(0, len(test_idx), EVAL_BATCH)]
        got[which] = [np.concatenate(o) for o in zip(*outs)]
    ref_taps.update({f"{m}__{n}": t for n, t in zip(names, got["ref"])})
    new_taps.update({f"{m}__{n}": t for n, t in zip(names, got["new"])})


def pack_accuracy(pack_folder: Path, entries: dict, ref_taps: dict, new_taps: dict, y: np.ndarray,
                   precision: str, threads: int) -> dict:
    """The current pack's test accuracy (%) on FP32 taps and on ``precision`` taps, and how often they
    agree; ``y`` holds class names."""
    from mmcl_edge.runtime.pack import load_pack

    pack = load_pack(pack_folder, entries, ["CPUExecutionProvider"], threads)
    classes = np.asarray(pack.manifest["label_names"])

    def predict(taps):
        out = []
        for b in range(0, len(y), EVAL_BATCH):
            logits, _ = pack.run({k: v[b:b + EVAL_BATCH] for k, v in taps.items()})
            out.append(classes[logits.argmax(1)])
        return np.concatenate(out)

    p32, pq = predict(ref_taps), predict(new_taps)
    return {"fp32": round(100 * float(np.mean(p32 == y)), 2), precision: round(100 * float(np.mean(pq == y)), 2),
            "agreement": round(100 * float(np.mean(p32 == pq)), 2), "samples": int(len(y)),
            "pack": pack_folder.name}
