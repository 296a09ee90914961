"""Baselines and the CL benchmark on the synthetic generator (real training, seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mmcl_edge.cli.main import app
from mmcl_edge.config import LearnConfig
from mmcl_edge.data import load_scenario
from mmcl_edge.learners import BASELINE_NAMES, create_learner, method_names
from mmcl_edge.stream import TapSource, run_stream

FAST = LearnConfig().override({"train.epochs": 4})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    sc = load_scenario("synthetic-cil", seed=0)
    return sc, TapSource(sc, tmp_path_factory.mktemp("taps"))


@pytest.mark.parametrize("name", [*BASELINE_NAMES, "mmcl", "mmcl-paper", "mmcl-m0-only"])
def test_every_method_learns_above_chance(synthetic, name):
    sc, src = synthetic
    learner = create_learner(name, FAST, src.modality_taps, sc.setting, sc.num_classes)
    report = run_stream(sc, learner, src).report()
    chance = 1.0 / sc.num_classes
    # the newest task is always learned, by every method
    assert report["accuracy_matrix"][-1][-1] > 2 * chance
    assert report["final_average_accuracy"] > chance


def test_rehearsal_free_protection_beats_finetune(synthetic):
    """Finetune forgets in class-IL; the method (and ridge, order-invariant) do not."""
    sc, src = synthetic
    final = {}
    for name in ("finetune", "mmcl", "ridge"):
        learner = create_learner(name, FAST, src.modality_taps, sc.setting, sc.num_classes)
        final[name] = run_stream(sc, learner, src).report()["final_average_accuracy"]
    assert final["mmcl"] > final["finetune"] + 0.2
    assert final["ridge"] > final["finetune"] + 0.2


def test_ridge_is_order_invariant_and_equals_joint_ridge(synthetic):
    """Streaming sums: the ridge head after the last task equals one solved on all data at once."""
    from mmcl_edge.learners.base import TaskData
    from mmcl_edge.stream import label_map

    sc, src = synthetic
    lmap = label_map(sc, len(sc.tasks) - 1)
    parts = [src.taps("train", t.train_idx, lmap)[0] for t in sc.tasks]
    stream = create_learner("ridge", FAST, src.modality_taps, sc.setting, sc.num_classes)
    for i, p in enumerate(parts):
        stream.learn_task(i, p, sc.num_classes)
    joint = create_learner("ridge", FAST, src.modality_taps, sc.setting, sc.num_classes)
    joint.learn_task(0, TaskData.concat(parts[::-1]), sc.num_classes)
    np.testing.assert_allclose(stream.head.weight.numpy(), joint.head.weight.numpy(), atol=1e-4)


def test_unknown_method_is_a_plain_error(synthetic):
    sc, src = synthetic
    with pytest.raises(KeyError, match="unknown method"):
        create_learner("nope", FAST, src.modality_taps, sc.setting, sc.num_classes)
    assert "mmcl-m0-only" in method_names(sc.modalities)


def test_bench_cl_writes_documented_json_and_png_plots(tmp_path):
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    result = CliRunner().invoke(app, ["bench", "cl", "--scenario", "synthetic-dil", "--methods", "mmcl,ridge,finetune",
                                      "--seeds", "2", "--epochs", "2", "--out", str(out), "--plot", str(plots),
                                      "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["scenario"] == "synthetic-dil" and data["seeds"] == 2
    assert set(data["methods"]) == {"mmcl", "ridge", "finetune"}
    for entry in data["methods"].values():
        for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "accuracy_matrix",
                    "learn_seconds", "seeds"):
            assert key in entry
        assert 0.0 <= entry["final_average_accuracy"] <= 1.0
        assert entry["seeds"] == 2 and len(entry["per_seed"]) == 2
        assert len(entry["accuracy_matrix"]) == 3  # three domains
    assert "final avg acc" in result.output
    pngs = sorted(plots.glob("*.png"))
    assert len(pngs) == 4  # a heatmap per method + the chart of all methods
    from PIL import Image

    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()


def test_bench_cl_validation_split_never_uses_test_samples():
    from mmcl_edge.data.dataset import validation_scenario

    sc = load_scenario("synthetic-cil", seed=1)
    val = validation_scenario(sc, 0.2, seed=1)
    train_keys = {x.tobytes() for x in sc.train.samples["m0"]}
    test_keys = {x.tobytes() for x in sc.test.samples["m0"]}
    val_keys = {x.tobytes() for x in val.test.samples["m0"]}
    fit_keys = {x.tobytes() for x in val.train.samples["m0"]}
    assert val_keys <= train_keys and not (val_keys & test_keys) and not (val_keys & fit_keys)
    for t_full, t_val in zip(sc.tasks, val.tasks):
        assert t_val.classes == t_full.classes
        assert set(val.test.y[t_val.test_idx]) <= set(t_full.classes)
