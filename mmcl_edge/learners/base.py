"""What every learner implements; the shared loop in ``stream.py`` calls only these steps."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TaskData:
    """Cached taps of a set of samples and their labels as head indices (order of arrival).

    ``present`` marks which modalities each sample has (``[N, M]``, in ``taps`` order; None = all).
    An absent modality's taps are zeros, as the runtime feeds them.
    """

    taps: dict[str, list[np.ndarray]]   # modality -> one [N, tokens, dim] array per tap
    y: np.ndarray                       # [N] head indices
    present: np.ndarray | None = None   # [N, M] 1 = the modality was there
    groups: np.ndarray | None = None    # [N] domain ids (who/where recorded), when the data has them

    def __len__(self) -> int:
        return len(self.y)

    def presence(self) -> np.ndarray:
        return np.ones((len(self.y), len(self.taps)), np.float32) if self.present is None else self.present

    def subset(self, idx) -> "TaskData":
        return TaskData({m: [t[idx] for t in ts] for m, ts in self.taps.items()}, self.y[idx],
                        None if self.present is None else self.present[idx],
                        None if self.groups is None else self.groups[idx])

    def only(self, modalities: list[str]) -> "TaskData":
        """The same samples seen through some of the modalities."""
        keep = [i for i, m in enumerate(self.taps) if m in modalities]
        return TaskData({m: ts for m, ts in self.taps.items() if m in modalities}, self.y,
                        None if self.present is None else self.present[:, keep])

    def without(self, modality: str) -> "TaskData":
        """The same samples with one modality missing (its taps zeroed, marked absent)."""
        present = self.presence().copy()
        present[:, list(self.taps).index(modality)] = 0.0
        taps = {m: ([np.zeros_like(t) for t in ts] if m == modality else ts) for m, ts in self.taps.items()}
        return TaskData(taps, self.y, present)

    @staticmethod
    def concat(parts: list["TaskData"]) -> "TaskData":
        mods = parts[0].taps
        taps = {m: [np.concatenate([p.taps[m][i] for p in parts]) for i in range(len(mods[m]))] for m in mods}
        present = None if all(p.present is None for p in parts) else np.concatenate([p.presence() for p in parts])
        return TaskData(taps, np.concatenate([p.y for p in parts]), present)


class Learner:
    """Base class. ``n_seen`` outputs are valid after a task (class-IL grows, domain-IL is fixed)."""

    name = "learner"

    def learn_task(self, task_index: int, data: TaskData, n_seen: int) -> dict:
        """Learn one task from its training data; returns extra info for the report."""
        raise NotImplementedError

    def predict(self, data: TaskData) -> np.ndarray:
        """Head indices predicted for every sample of ``data``."""
        raise NotImplementedError
