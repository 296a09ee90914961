"""Learners: the method, its ablations and the baselines, all driven by one task loop (``stream.py``)."""
from mmcl_edge.learners.base import Learner, TaskData
from mmcl_edge.learners.adapter import AdapterLearner

__all__ = ["Learner", "TaskData", "AdapterLearner", "create_learner", "method_names", "ABLATIONS", "BASELINE_NAMES"]

BASELINE_NAMES = ("finetune", "lwf", "ewc", "er", "simplecil", "ridge", "joint")

# The method's variants as configuration: "mmcl" is the default; "mmcl-paper" is the paper's method
# as published; the others switch one piece off.
# The paper's own choices where our defaults differ (chosen on the validation split, see
# benchmarks/README.md): a gradient-trained linear head, preservation weight 1, one learning rate.
PAPER = {"head": "linear", "loss.preserve": 1.0, "train.later_lr_scale": 1.0}

ABLATIONS = {
    "mmcl": {},
    "mmcl-paper": PAPER,
    "mmcl-paper+analytic": {k: v for k, v in PAPER.items() if k != "head"},
    "mmcl-no-align": {"loss.align": 0.0},
    "mmcl-no-preserve": {"loss.preserve": 0.0},
    "mmcl-no-distill": {"loss.distill": 0.0},
    "mmcl-no-freeze": {"freeze.enabled": False},
    "mmcl-no-xmodal": {"encoder.cross_modal_routing": False},
    "mmcl-no-drift-comp": {"drift_compensation": False},
    "mmcl-no-slow-learner": {"train.later_lr_scale": 1.0},
}


def method_names(modalities: list[str]) -> list[str]:
    """Every runnable name: method variants, single-modality ablations, baselines."""
    single = [f"mmcl-{m}-only" for m in modalities] if len(modalities) > 1 else []
    return [*ABLATIONS, *single, *BASELINE_NAMES]


def create_learner(name: str, config, modality_taps: dict, setting: str, n_classes: int) -> Learner:
    """Build a learner by name on a scenario's taps (``modality_taps``)."""
    from mmcl_edge.learners import baselines

    if name in ABLATIONS:
        return AdapterLearner(config.override(ABLATIONS[name]), modality_taps, setting, n_classes)
    if name.startswith("mmcl-") and name.endswith("-only") and name[5:-5] in modality_taps:
        return baselines.SingleModalityLearner(
            lambda taps, *a: AdapterLearner(config, taps, *a), name[5:-5], modality_taps, setting, n_classes)
    if name in baselines.BASELINES:
        return baselines.BASELINES[name](config, modality_taps, setting, n_classes)
    raise KeyError(f"unknown method {name!r}; known: {', '.join(method_names(list(modality_taps)))}")
