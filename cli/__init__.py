"""The ``mmcl-edge`` command line (typer)."""
