"""What storing a pack's weights as int8 costs (issue #19): size and test accuracy of the last pack.

    python benchmarks/pack_weights.py WS [--out results/pack-weights-X.json]

Writes the pack of ``WS``'s last learned task both ways (``pack_weights`` float16 and int8, into a
temporary folder; the workspace is not changed), runs both through onnxruntime on the test split's
cached taps, with every modality present and with each one absent, and prints sizes, accuracies
and how often the two agree.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from mmcl_edge.threads import apply_env_defaults

    apply_env_defaults()
    import onnxruntime as ort

    from mmcl_edge.export.pack_graph import WEIGHT_STORAGE, build_pack_model, save_pack_model
    from mmcl_edge.stream import label_map
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(args.workspace)
    sc, src = ws.scenario(), ws.tap_source()
    last = ws.learned_tasks() - 1
    model = ws.load_model(last).eval()
    idx = np.arange(len(sc.test.y))
    data, _, _ = src.taps("test", idx, label_map(sc, last))
    feeds = {f"{m}__{spec.name}": t.astype(np.float32) for m, ts in data.taps.items()
             for spec, t in zip(src.backbones[m].taps, ts)}
    feeds["present"] = np.ones((len(idx), len(data.taps)), np.float32)
    cases = {"all": feeds}
    for i, m in enumerate(data.taps):
        f = {k: (np.zeros_like(v) if k.startswith(f"{m}__") else v) for k, v in feeds.items()}
        f["present"] = feeds["present"].copy()
        f["present"][:, i] = 0
        cases[f"without {m}"] = f
    result = {"workspace": str(ws.root), "task": last, "test_samples": int(len(idx)), "storage": {}}
    predictions, all_logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for storage in WEIGHT_STORAGE:
            graph, sizes = build_pack_model(model, storage)
            path = Path(tmp) / f"{storage}.onnx"
            save_pack_model(graph, path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            logits = {c: session.run(["logits"], f)[0] for c, f in cases.items()}
            predictions[storage] = {c: v.argmax(1) for c, v in logits.items()}
            all_logits[storage] = logits["all"]
            result["storage"][storage] = {
                "file_bytes": path.stat().st_size, **sizes,
                "accuracy": {c: round(100 * float(np.mean(p == data.y)), 2) for c, p in predictions[storage].items()}}
    for storage, entry in result["storage"].items():
        entry["agreement_with_float16"] = {c: round(100 * float(np.mean(p == predictions["float16"][c])), 2)
                                           for c, p in predictions[storage].items()}
        entry["max_logit_change"] = round(float(np.abs(all_logits[storage] - all_logits["float16"]).max()), 4)
    for storage, entry in result["storage"].items():
        print(f"{storage:8s} {entry['file_bytes'] / 1024:7.0f} KiB  accuracy {entry['accuracy']}  "
              f"same as float16 {entry['agreement_with_float16']}  max logit change {entry['max_logit_change']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
