"""``mmcl-edge``: learn, evaluate, export, predict, inspect and benchmark."""
from __future__ import annotations

import sys

import typer
from mmcl_edge.threads import apply_env_defaults

apply_env_defaults()  # the thread policy's OpenMP wait policy, before any command imports torch (mmcl_edge/threads.py)

from mmcl_edge.cli import bag, bench, data, fleet, keys, learning, predicting, serving, teaching  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Multi-modal continual learning on edge devices: frozen backbones, cross-modality "
                       "mixture-of-experts adapters learned task by task, hot-swapped into a torch-free runtime.")
# Top-level commands, then the groups: the order `mmcl-edge --help` lists them in.
app.command()(teaching.teach)
app.command()(learning.learn)
app.command("eval")(learning.evaluate)
app.command()(learning.export)
app.command()(predicting.predict)
app.command()(serving.serve)
app.command()(predicting.info)
app.add_typer(bag.bag_app, name="bag")
app.add_typer(data.data_app, name="data")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(fleet.fleet_app, name="fleet")
app.add_typer(keys.keys_app, name="keys")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
