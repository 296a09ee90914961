"""``mmcl-edge data ...``: get data sets (only ever downloads when asked)."""
from __future__ import annotations

from pathlib import Path

import typer
from mmcl_edge.cli.common import out, user_errors

data_app = typer.Typer(no_args_is_help=True, help="Get data sets (only ever downloads when you ask).")


@data_app.command("download-fsdd")
@user_errors
def download_fsdd(to: Path = typer.Option(..., help="Folder to put FSDD's recordings/ into.")):
    """Download the Free Spoken Digit Dataset (CC BY-SA 4.0) from its GitHub repository."""
    from mmcl_edge.data.fsdd import download_fsdd as fetch

    folder = fetch(to)
    out.print(f"FSDD recordings in {folder}; use --data-dir {folder} or MMCL_EDGE_DATA={folder}")

