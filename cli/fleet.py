"""``mmcl-edge fleet status URL...``: which pack each member of a fleet serves, and how far behind it is."""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import typer
from rich.markup import escape
from rich.table import Table

from mmcl_edge.cli.common import err, out, user_errors
from mmcl_edge.errors import RuntimeUserError

fleet_app = typer.Typer(no_args_is_help=True, help="A fleet of serves: leaders and their followers.")


def _get(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def status_rows(urls: list[str], model: str = "mmcl", timeout: float = 5.0) -> list[dict]:
    """One row per URL (and per follower that registered with one of them): role, the version it
    serves, its leader's version, how many versions and seconds it is behind the newest seen."""
    rows = []
    for url in urls:
        base = (url if "://" in url else f"http://{url}").rstrip("/")
        models = f"{base}/v2/models/{urllib.parse.quote(model)}"
        try:
            packs = _get(f"{models}/packs", timeout)
            fleet = _get(f"{models}/fleet", timeout)
        except (OSError, ValueError) as exc:
            rows.append({"url": base, "role": "unreachable", "error": str(getattr(exc, "reason", exc))[:200]})
            continue
        follows = packs.get("follows")
        row = {"url": base, "role": "follower" if follows else "leader", "serving": packs["serving"],
               "workspace_id": packs.get("workspace_id")}
        if follows:
            row.update(leader=follows["leader"], leader_version=follows["leader_version"],
                       behind_seconds=follows["behind_seconds"], last_contact_seconds=follows["last_contact_seconds"],
                       error=follows["last_error"])
        rows.append(row)
        for m in fleet.get("members", []):
            rows.append({"url": m["url"] or m["member"], "role": f"registered with {base}", "serving": m["serving"],
                         "leader": base, "leader_version": fleet["serving"], "behind_seconds": m["behind_seconds"],
                         "last_contact_seconds": m["last_seen_seconds"]})
    newest = max([r["serving"] for r in rows if r.get("serving") is not None]
                 + [r["leader_version"] for r in rows if r.get("leader_version") is not None], default=None)
    for r in rows:
        if r.get("serving") is not None and newest is not None:
            r["behind_versions"] = newest - r["serving"]
    return rows


@fleet_app.command("status")
@user_errors
def status(urls: list[str] = typer.Argument(..., help="Serves to ask (http://HOST:PORT): leaders, followers or both. "
                                                      "A leader also lists the followers that poll it."),
           model_name: str = typer.Option("mmcl", help="The model's name in the protocol's URLs."),
           timeout: float = typer.Option(5.0, min=0.1, help="Seconds to wait for each serve."),
           as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")):
    """Which pack version each member serves and how far behind the newest it is (exit 1: one is unreachable)."""
    for u in urls:
        scheme = urllib.parse.urlparse(u if "://" in u else f"http://{u}").scheme
        if scheme not in ("http", "https"):
            raise RuntimeUserError(f"{u!r} is not an http:// URL of a serve")
    rows = status_rows(urls, model_name, timeout)
    if as_json:
        out.print_json(json.dumps({"at": time.time(), "members": rows}))
    else:
        t = Table(title="Fleet")
        for c in ("member", "role", "serving", "behind", "behind s", "heard s", "error"):
            t.add_column(c)
        fmt = lambda v: "–" if v is None else str(v)  # noqa: E731
        for r in rows:
            t.add_row(escape(r["url"]), escape(r["role"]), fmt(r.get("serving")), fmt(r.get("behind_versions")),
                      fmt(r.get("behind_seconds")), fmt(r.get("last_contact_seconds")), escape(r.get("error") or ""))
        out.print(t)
    if any(r["role"] == "unreachable" for r in rows):
        err.print("error: " + ", ".join(r["url"] for r in rows if r["role"] == "unreachable") + " did not answer",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
