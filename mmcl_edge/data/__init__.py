"""Data: multi-modal data sets, task streams and the built-in scenarios."""
from mmcl_edge.data.dataset import DataFormatError, MultiModalDataset, Scenario, Task

# The built-in task streams (synthetic-* are small and made up, for tests and quick tries).
SCENARIOS = ("avdigits-cil", "avdigits-dil", "utd-mhad-cil", "utd-mhad-dil", "clothing-cil", "synthetic-cil",
             "synthetic-dil")

__all__ = ["SCENARIOS", "DataFormatError", "MultiModalDataset", "Scenario", "Task", "load_scenario"]


def load_scenario(name: str | None = None, *, data: str | None = None, data_dir: str | None = None,
                  setting: str = "class-il", classes_per_task: int = 2, seed: int = 0) -> Scenario:
    """One entry point for the built-in scenarios and for user data in the generic format. Vector
    modalities are standardised with the statistics of the first task's training data."""
    from mmcl_edge.data.dataset import scaled_specs

    sc = _load(name, data, data_dir, setting, classes_per_task, seed)
    if sc.tasks:
        sc.specs = scaled_specs(sc.specs, sc.train.subset(sc.tasks[0].train_idx))
    return sc


def _load(name, data, data_dir, setting, classes_per_task, seed) -> Scenario:
    if data is not None:
        from mmcl_edge.data.generic import load_generic
        return load_generic(data, setting=setting, classes_per_task=classes_per_task, seed=seed)
    if name in ("avdigits-cil", "avdigits-dil"):
        from mmcl_edge.data.avdigits import load_avdigits
        return load_avdigits("class-il" if name.endswith("cil") else "domain-il", data_dir=data_dir, seed=seed)
    if name in ("utd-mhad-cil", "utd-mhad-dil"):
        from mmcl_edge.data.utdmhad import load_utd_mhad
        return load_utd_mhad("class-il" if name.endswith("cil") else "domain-il", data_dir=data_dir, seed=seed)
    if name == "clothing-cil":
        from mmcl_edge.data.clothing import load_clothing
        return load_clothing(data_dir=data_dir, seed=seed)
    if name == "synthetic-cil" or name == "synthetic-dil":
        from mmcl_edge.data.synthetic import synthetic_scenario
        return synthetic_scenario("class-il" if name.endswith("cil") else "domain-il", seed=seed)
    raise DataFormatError(f"unknown scenario {name!r}: use {', '.join(SCENARIOS)}, or --data DIR")
