#!/usr/bin/env bash
# The base install is torch-free: a fresh venv with only the base + cpu + serve + ros extras runs
# 'mmcl-edge info', 'predict', 'bag inspect', 'predict --bag', 'bench latency' and a 'serve' round-trip over a workspace that the
# learner (the current environment, installed from requirements-ci.txt) made.
#   bash .ci/torch_free_check.sh            (PYTHON=... to pick the learner's interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python}"
WORK="$(mktemp -d)"
SERVER=""
FOLLOWER=""
cleanup() {
  for p in $FOLLOWER $SERVER; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
step() { echo "torch-free check: $*"; }

step "the learner makes a tiny workspace (synthetic-cil, 2 epochs)"
"$PY" -m mmcl_edge.cli.main learn --scenario synthetic-cil --epochs 2 -w "$WORK/ws" > "$WORK/learn.log" 2>&1 \
  || { cat "$WORK/learn.log"; exit 1; }
"$PY" - "$WORK" <<'PY'
import json, sys
import numpy as np
from mmcl_edge.data import load_scenario
from mmcl_edge.runtime import Runtime
work = sys.argv[1]
sc = load_scenario("synthetic-cil")
x = {m: np.stack(sc.test.samples[m][:5]).astype(np.float32) for m in sc.specs}
np.savez(f"{work}/inputs.npz", **{f"x_{m}": v for m, v in x.items()})
json.dump(Runtime(f"{work}/ws").predict(x).labels, open(f"{work}/expected.json", "w"))
PY
"$PY" - "$WORK" "$REPO" <<'PY'
# a robot's recording of the two sensors (Float32MultiArray at 10 Hz) and what replaying it answers here
import json, sys
import numpy as np
work, repo = sys.argv[1], sys.argv[2]
sys.path.insert(0, f"{repo}/tests")
from bagkit import ORIGIN_NS, Messages, Stream, write_bag
from mmcl_edge.data import load_scenario
from mmcl_edge.ros import replay
from mmcl_edge.runtime import Runtime
sc, mk = load_scenario("synthetic-cil"), Messages()
streams = [Stream(f"/{m}", "std_msgs/msg/Float32MultiArray") for m in sc.specs]
for k in range(60):
    for s, m in zip(streams, sc.specs):
        s.messages.append((ORIGIN_NS + k * 100_000_000, mk.float32_multiarray(sc.test.samples[m][k // 10])))
write_bag(f"{work}/rec", streams, "mcap")
json.dump({m: {"topic": f"/{m}", "kind": "vector"} for m in sc.specs}, open(f"{work}/topics.json", "w"))
json.dump([a["label"] for a in replay(Runtime(f"{work}/ws"), f"{work}/rec", f"{work}/topics.json", 1.0, 1.0)],
          open(f"{work}/expected_bag.json", "w"))
PY

step "a fresh venv with the base + cpu + serve + ros extras only"
"$PY" -m venv "$WORK/venv"
DPY="$WORK/venv/bin/python"
"$DPY" -m pip install -q --disable-pip-version-check "$REPO[cpu,serve,ros]"
if "$DPY" -c "import torch" 2>/dev/null; then echo "torch is importable in the device venv" >&2; exit 1; fi
DEV="$WORK/venv/bin/mmcl-edge"
cd "$WORK"  # from here on a checkout's mmcl_edge/ in the working folder must not shadow the installed package

step "mmcl-edge info"
"$DEV" info -w "$WORK/ws" > "$WORK/info.txt"
grep -q "v0002" "$WORK/info.txt"

step "mmcl-edge predict"
"$DEV" predict -w "$WORK/ws" -i "$WORK/inputs.npz" --json > "$WORK/pred.json"
"$DPY" -c "import json,sys; a=json.load(open(sys.argv[1]))['labels']; b=json.load(open(sys.argv[2])); assert a==b,(a,b)" \
  "$WORK/pred.json" "$WORK/expected.json"

step "mmcl-edge bag inspect, predict --bag --out"
"$DEV" bag inspect "$WORK/rec" --json > "$WORK/inspect.json" 2>&1 || { cat "$WORK/inspect.json"; exit 1; }
grep -q '"std_msgs/msg/Float32MultiArray"' "$WORK/inspect.json" || { cat "$WORK/inspect.json"; exit 1; }
"$DEV" predict -w "$WORK/ws" --bag "$WORK/rec" --topics "$WORK/topics.json" --window 1.0 --hop 1.0 --json \
  --out "$WORK/rec_pred" > "$WORK/pred_bag.jsonl" 2> "$WORK/pred_bag.err" || { cat "$WORK/pred_bag.err"; exit 1; }
"$DPY" - "$WORK" <<'PY'
import json, sys
from mmcl_edge.ros import Bag
work = sys.argv[1]
got = [json.loads(line)["label"] for line in open(f"{work}/pred_bag.jsonl")]
assert got == json.load(open(f"{work}/expected_bag.json")) and len(got) == 5, got
with Bag(f"{work}/rec_pred") as b:
    assert b.topics["/mmcl/prediction"] == ("std_msgs/msg/String", 5), b.topics
assert "torch" not in sys.modules
print("  replayed", len(got), "windows:", got)
PY

step "mmcl-edge bench latency (no PyTorch-eager comparison here)"
"$DEV" bench latency -w "$WORK/ws" --batch 1 --repeats 5 --out "$WORK/lat.json" > "$WORK/lat.txt" 2> "$WORK/lat.err" \
  || { cat "$WORK/lat.txt" "$WORK/lat.err"; exit 1; }
grep -q "PyTorch-eager comparison skipped" "$WORK/lat.err" || { cat "$WORK/lat.err"; exit 1; }
"$DPY" -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['pytorch_eager'].startswith('skipped'); print('  p50 total', round(r['batches']['1']['stages_ms']['total']['p50'], 2), 'ms')" "$WORK/lat.json"

step "mmcl-edge serve: a round-trip over HTTP on 127.0.0.1"
PORT="$("$DPY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
"$DEV" serve -w "$WORK/ws" --port "$PORT" > "$WORK/serve.log" 2>&1 &
SERVER=$!
cat > "$WORK/roundtrip.py" <<'PY'
"""Wait until the server on 127.0.0.1:PORT is ready, infer the saved inputs, check the labels and pack v0002."""
import json, sys, time, urllib.request
import numpy as np
port, work, log, who = sys.argv[1:5]
base = f"http://127.0.0.1:{port}"
end = time.monotonic() + 60
while True:
    try:
        if urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5).status == 200:
            break
    except OSError:
        if time.monotonic() > end:
            sys.exit(f"the {who} did not become ready: " + open(log).read())
        time.sleep(0.2)
with np.load(f"{work}/inputs.npz") as z:
    body = {"id": "ci", "inputs": [{"name": k[2:], "shape": list(z[k].shape), "datatype": "FP32",
                                    "data": z[k].ravel().tolist()} for k in z.files]}
req = urllib.request.Request(f"{base}/v2/models/mmcl/infer", data=json.dumps(body).encode(), method="POST")
answer = json.load(urllib.request.urlopen(req, timeout=30))
labels = next(o for o in answer["outputs"] if o["name"] == "labels")["data"]
assert labels == json.load(open(f"{work}/expected.json")), labels
assert answer["id"] == "ci" and answer["parameters"]["pack_version"] == 2, answer
assert "mmcl_pack_version 2.0" in urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
print(f"  the {who} answers", labels, "from pack v%04d" % answer["parameters"]["pack_version"])
PY
"$DPY" "$WORK/roundtrip.py" "$PORT" "$WORK" "$WORK/serve.log" server
step "mmcl-edge serve --follow: a follower of that serve, in its own folder (backbones and pack fetched over HTTP)"
FPORT="$("$DPY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
"$DEV" serve -w "$WORK/follower" --port "$FPORT" --follow "http://127.0.0.1:$PORT" --insecure > "$WORK/follow.log" 2>&1 &
FOLLOWER=$!
"$DPY" "$WORK/roundtrip.py" "$FPORT" "$WORK" "$WORK/follow.log" follower
step "text: a workspace with a text modality, predicted in the device venv (tokenizers, no torch)"
"$PY" - "$WORK" <<'PY'
import json, sys
import numpy as np
work = sys.argv[1]
rng = np.random.default_rng(0)
words = {0: "dress gown skirt hem", 1: "jeans denim pants waist", 2: "coat jacket hood zipper"}
for split, n in (("train", 10), ("test", 3)):
    notes = [" ".join(rng.choice(words[c].split() + ["size", "fits", "love"], 8)) for c in words for _ in range(n)]
    np.savez(f"{work}/text-{split}.npz", x_note=np.array(notes), x_stars=rng.uniform(1, 5, (len(notes), 1)).astype(np.float32),
             y=np.repeat(list(words), n))
import os, shutil
os.makedirs(f"{work}/textdata")
for split in ("train", "test"):
    shutil.move(f"{work}/text-{split}.npz", f"{work}/textdata/{split}.npz")
json.dump({"note": {"kind": "text", "max_tokens": 16}, "stars": {"kind": "vector"}}, open(f"{work}/textdata/modalities.json", "w"))
PY
"$PY" -m mmcl_edge.cli.main learn --data "$WORK/textdata" --classes-per-task 2 --epochs 2 -w "$WORK/ws-text" > "$WORK/learn-text.log" 2>&1 \
  || { cat "$WORK/learn-text.log"; exit 1; }
"$PY" -m mmcl_edge.cli.main predict -w "$WORK/ws-text" -i "$WORK/textdata/test.npz" --json > "$WORK/text-expected.json"
"$DEV" predict -w "$WORK/ws-text" -i "$WORK/textdata/test.npz" --json > "$WORK/text-pred.json"
"$DPY" -c "import json,sys; a,b=(json.load(open(p))['labels'] for p in sys.argv[1:]); assert a==b,(a,b); print('  text labels', a)" \
  "$WORK/text-pred.json" "$WORK/text-expected.json"
"$DEV" predict -w "$WORK/ws-text" -i "note=a denim jeans with a high waist" --json > /dev/null

echo "torch-free check passed"
