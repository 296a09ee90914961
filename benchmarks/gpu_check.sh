#!/usr/bin/env bash
# GPU paths on a CUDA machine (run by hand there; CI has no GPU). Expects:
#   $WS_AV, $WS_UTD: workspaces (backbones + packs; no data needed: random inputs of the right shapes)
#   $WS_AV_FP16: a copy of $WS_AV after 'mmcl-edge export --precision fp16' (optional)
#   an onnxruntime build with the CUDA provider importable, and mmcl-edge installed.
# Writes JSON into ${OUT:-gpu-results}.
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/providers.txt"
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_device(), ort.get_available_providers())
from mmcl_edge.runtime import providers as prov
print("default choice", prov.choose())
PY
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "provider or plain_error" 2>&1 | tail -5 | tee "$OUT/pytest-gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/parity.txt"
import os, json, time, numpy as np
from mmcl_edge.runtime import Runtime
from mmcl_edge.runtime.latency import example_inputs
res = {}
for name in ("WS_AV", "WS_UTD", "WS_AV_FP16"):
    root = os.environ.get(name)
    if not root or not os.path.isdir(root):
        continue
    cpu = Runtime(root, providers="cpu")
    x = example_inputs(cpu, 32, seed=1)
    a = cpu.predict(x)
    for p in ("cuda", None):
        try:
            t = time.perf_counter(); rt = Runtime(root, providers=p); load = time.perf_counter() - t
            b = rt.predict(x)
            res[f"{name}:{p or 'default'}"] = {"backends": rt.backbones.backends, "load_s": load,
                "max_abs_prob_diff": float(np.abs(a.probabilities - b.probabilities).max()),
                "label_agreement": float(np.mean(np.array(a.labels) == np.array(b.labels)))}
        except Exception as exc:
            res[f"{name}:{p or 'default'}"] = {"error": repr(exc)[:500]}
print(json.dumps(res, indent=1))
PY
for ws in "$WS_AV" "$WS_UTD" "${WS_AV_FP16:-}"; do
  [ -d "$ws" ] || continue
  n=$(basename "$ws")
  python3 -m mmcl_edge.cli.main bench latency -w "$ws" --provider cuda --batch 1 --batch 8 --repeats 200 --out "$OUT/lat-$n-cuda.json" 2>&1 | tail -30
  python3 -m mmcl_edge.cli.main bench latency -w "$ws" --provider cpu --batch 1 --batch 8 --repeats 100 --no-memory --out "$OUT/lat-$n-cpu.json" 2>&1 | tail -12
done
python3 -m mmcl_edge.cli.main bench swap -w "$WS_AV" --provider cuda --threads 4 --swaps 200 --baseline-seconds 3 --out "$OUT/swap-cuda.json" 2>&1 | tail -14
python3 - <<'PY' 2>&1 | tail -3 | tee "$OUT/tensorrt.txt"
import os, onnxruntime as ort
p = os.path.join(os.environ["WS_AV"], "backbones", "image.onnx")
try:
    s = ort.InferenceSession(p, providers=["TensorrtExecutionProvider"])
    print("TensorRT EP session providers:", s.get_providers())
except Exception as exc:
    print("TensorRT EP unavailable:", repr(exc)[:400])
PY
