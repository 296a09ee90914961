"""Learners: the paper's method and the baselines, all driven by one task loop (``stream.py``)."""
from mmcl_edge.learners.base import Learner, TaskData
from mmcl_edge.learners.adapter import AdapterLearner

__all__ = ["Learner", "TaskData", "AdapterLearner", "create_learner", "METHODS"]

METHODS = ("mmcl",)


def create_learner(name: str, scenario_info: dict, config) -> Learner:
    """Build a learner by name. ``scenario_info``: modality_taps, setting, n_classes."""
    if name == "mmcl":
        return AdapterLearner(config, **scenario_info)
    from mmcl_edge.learners import baselines

    return baselines.create(name, scenario_info, config)
