"""What learning on INT8 taps gives (issue #19): packs learned on the taps they will be served on.

    python benchmarks/int8_taps.py WS OUT --modality depth [--modality skeleton ...] [--calibrate first-task|all]

``WS`` is a learned FP32 workspace of a built-in scenario (its exported backbones and its data set
are reused). The chosen backbones are quantised as ``export --precision int8`` does (static, QDQ,
64 calibration samples spread over the classes of the first task's training data, what a device
has when it starts, or of the whole training split), then the scenario is learned again into
``OUT`` with every tap of those modalities extracted through the INT8 files. The accuracy matrix
then says what serving INT8 costs when the pack was learned on INT8 taps, against ``WS``'s own
(FP32) and against ``export --precision int8`` on ``WS`` (FP32-learned pack, INT8 taps).

An experiment harness, not the product's path: it routes the tap cache's extraction of those
modalities through onnxruntime sessions of the INT8 files (their own cache folders); the learner,
the ridge head and the evaluation run unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--modality", action="append", required=True)
    ap.add_argument("--calibrate", choices=("first-task", "all"), default="first-task")
    args = ap.parse_args()

    from mmcl_edge.threads import apply_env_defaults

    apply_env_defaults()
    import onnxruntime as ort
    import torch

    import mmcl_edge.taps as taps_module
    from mmcl_edge.export.quantize import quantize_int8, spread_indices
    from mmcl_edge.preprocess import preprocess_batch
    from mmcl_edge.workspace import Workspace

    ws = Workspace.open(args.workspace)
    sc = ws.scenario()
    index = json.loads((ws.root / "backbones" / "backbones.json").read_text())["modalities"]
    idx = np.asarray(sc.tasks[0].train_idx) if args.calibrate == "first-task" else np.arange(len(sc.train.y))
    idx = idx[spread_indices(sc.train.y[idx], 64)]
    folder = args.out.parent / f"{args.out.name}-int8-backbones"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for m in args.modality:
        x = preprocess_batch([sc.train.samples[m][i] for i in idx], sc.specs[m])
        files[m] = folder / f"{m}.int8.onnx"
        quantize_int8(ws.root / "backbones" / index[m].get("fp32_file", index[m]["file"]), files[m], x, "x")
        print(f"{m}: quantised on {len(x)} samples ({args.calibrate})", flush=True)

    class Int8Backbone:
        """The PyTorch backbone's description, its taps computed by the INT8 file."""

        def __init__(self, backbone, path):
            self.backbone = backbone
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def __getattr__(self, name):
            return getattr(self.backbone, name)

        def identity(self):
            return f"{self.backbone.identity()}-int8-{args.calibrate}"

        def __call__(self, x):
            return tuple(torch.from_numpy(t) for t in self.session.run(None, {"x": x.numpy()}))

    original, wrapped = taps_module.TapCache.get, {}

    def get(self, modality, samples, spec, backbone, *rest, **kw):
        if modality in files:
            backbone = wrapped.setdefault(modality, Int8Backbone(backbone, files[modality]))
        return original(self, modality, samples, spec, backbone, *rest, **kw)

    taps_module.TapCache.get = get
    from mmcl_edge.cli.main import app

    source = ws.meta["source"]
    sys.argv = ["mmcl-edge", "learn", "--scenario", source["scenario"], "-w", str(args.out)]
    if source.get("data_dir"):
        sys.argv += ["--data-dir", source["data_dir"]]
    try:
        app()
    except SystemExit as exc:
        if exc.code:
            return int(exc.code)
    fp32 = json.loads((ws.root / "report.json").read_text())["final_average_accuracy"]
    int8 = json.loads((args.out / "report.json").read_text())["final_average_accuracy"]
    print(f"final average accuracy: FP32-learned {100 * fp32:.2f}%, learned on INT8 taps ({', '.join(files)}; "
          f"calibrated on {args.calibrate}) {100 * int8:.2f}% ({100 * (int8 - fp32):+.2f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
