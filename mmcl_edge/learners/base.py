"""What every learner implements; the shared loop in ``stream.py`` calls only these steps."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TaskData:
    """Cached taps of a set of samples and their labels as head indices (order of arrival)."""

    taps: dict[str, list[np.ndarray]]   # modality -> one [N, tokens, dim] array per tap
    y: np.ndarray                       # [N] head indices

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "TaskData":
        return TaskData({m: [t[idx] for t in ts] for m, ts in self.taps.items()}, self.y[idx])

    @staticmethod
    def concat(parts: list["TaskData"]) -> "TaskData":
        mods = parts[0].taps
        taps = {m: [np.concatenate([p.taps[m][i] for p in parts]) for i in range(len(mods[m]))] for m in mods}
        return TaskData(taps, np.concatenate([p.y for p in parts]))


class Learner:
    """Base class. ``n_seen`` outputs are valid after a task (class-IL grows, domain-IL is fixed)."""

    name = "learner"

    def learn_task(self, task_index: int, data: TaskData, n_seen: int) -> dict:
        """Learn one task from its training data; returns extra info for the report."""
        raise NotImplementedError

    def predict(self, data: TaskData) -> np.ndarray:
        """Head indices predicted for every sample of ``data``."""
        raise NotImplementedError
