"""Learners: the method, its ablations and the baselines, all driven by one task loop (``stream.py``)."""
import itertools

from mmcl_edge.learners.base import Learner, TaskData
from mmcl_edge.learners.adapter import AdapterLearner

__all__ = ["Learner", "TaskData", "AdapterLearner", "create_learner", "method_names", "ABLATIONS", "BASELINE_NAMES"]

BASELINE_NAMES = ("finetune", "lwf", "ewc", "er", "simplecil", "ridge", "ranpac", "raw-ridge", "joint")

# The method's variants as configuration: "mmcl" is the default; "mmcl-paper" is the paper's method
# as published; the others switch one piece off.
# The paper's own choices where our defaults differ (chosen on the validation split, see
# benchmarks/README.md): a gradient-trained linear head, preservation weight 1, one learning rate.
PAPER = {"head": "linear", "loss.preserve": 1.0, "train.later_lr_scale": 1.0, "train.modality_dropout": 0.0}

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
    "mmcl-no-modality-dropout": {"train.modality_dropout": 0.0},
}


def modality_subsets(modalities: list[str]) -> list[list[str]]:
    """The proper subsets the fusion ablation rows use: each modality alone, and each pair when
    there are three or more (in the scenario's modality order)."""
    if len(modalities) < 2:
        return []
    subsets = [[m] for m in modalities]
    if len(modalities) >= 3:
        subsets += [list(p) for p in itertools.combinations(modalities, 2)]
    return subsets


def method_names(modalities: list[str]) -> list[str]:
    """Every runnable name: method variants, modality-subset ablations, baselines."""
    from mmcl_edge.learners.baselines import subset_name

    return [*ABLATIONS, *(subset_name("mmcl", s) for s in modality_subsets(modalities)), *BASELINE_NAMES]


def tap_encoding(name: str) -> str | None:
    """The encoding whose taps a method learns from, when it is not the scenario's default."""
    from mmcl_edge.learners import baselines

    return getattr(baselines.BASELINES.get(name), "encoding", None)


def create_learner(name: str, config, modality_taps: dict, setting: str, n_classes: int) -> Learner:
    """Build a learner by name on a scenario's taps (``modality_taps``)."""
    from mmcl_edge.learners import baselines

    if name in ABLATIONS:
        return AdapterLearner(config.override(ABLATIONS[name]), modality_taps, setting, n_classes)
    for subset in modality_subsets(list(modality_taps)):
        if name == baselines.subset_name("mmcl", subset):
            return baselines.SubsetLearner(lambda taps, *a: AdapterLearner(config, taps, *a), subset,
                                           modality_taps, setting, n_classes)
    if name in baselines.BASELINES:
        return baselines.BASELINES[name](config, modality_taps, setting, n_classes)
    raise KeyError(f"unknown method {name!r}; known: {', '.join(method_names(list(modality_taps)))}")
