"""``mmcl-edge keys ...``: Ed25519 keys for signed packs."""
from __future__ import annotations

from pathlib import Path

import typer
from mmcl_edge.cli.common import out, user_errors

keys_app = typer.Typer(no_args_is_help=True, help="Ed25519 keys for signed packs.")


@keys_app.command("new")
@user_errors
def keys_new(out_dir: Path = typer.Option(..., "--out", help="Folder for signing.key (mode 0600) and signing.pub.")):
    """Make a signing key pair: learn with --signing-key DIR/signing.key, serve with --trusted-key DIR/signing.pub."""
    from mmcl_edge.runtime.trust import key_id, load_public_key, new_keypair

    private, public = new_keypair(out_dir)
    out.print(f"private key {private} (keep it on the learning device only; mode 0600)")
    out.print(f"public key  {public} (key id {key_id(load_public_key(public))}; give it to every runtime)")

