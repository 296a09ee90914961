"""Finding a prepared data set on disk: one search order for every built-in data set, so that
``--data-dir``, the data set's own environment variable and ``$MMCL_EDGE_DATA`` mean the same thing
everywhere."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable


def find_data_folder(data_dir: str | os.PathLike | None, env_var: str,
                     candidates: Callable[[Path], Iterable[Path]], is_it: Callable[[Path], bool]
                     ) -> tuple[Path | None, str]:
    """The first of ``candidates(root)`` for which ``is_it`` holds, for ``root`` = ``data_dir``, then
    ``$env_var``, then ``$MMCL_EDGE_DATA``; else ``None`` and " (looked in ...)" for the error."""
    tried: list[str] = []
    for given in (data_dir, os.environ.get(env_var), os.environ.get("MMCL_EDGE_DATA")):
        if not given or str(Path(given).expanduser()) in tried:
            continue
        root = Path(given).expanduser()
        for candidate in candidates(root):
            if is_it(candidate):
                return candidate, ""
        tried.append(str(root))
    return None, (f" (looked in {', '.join(tried)})" if tried else "")
