"""Signed packs: Ed25519 keys, signing at publish, verification before a pack may serve.

    mmcl-edge keys new --out keys/      keys/signing.key (private, mode 0600), keys/signing.pub
    WS/keys/signing.key                 a workspace with a key here signs every pack it publishes
    Runtime(ws, trusted_keys=["keys/signing.pub"])   refuses unsigned, mis-signed and foreign packs

The signature covers the manifest's sha256, which covers every field of the manifest (version,
task, classes, label names, workspace id, scenario, ...) and the sha256 of every file in the pack.
It is stored beside the manifest in ``signature.json``. ``cryptography`` is needed only where keys
are used (``pip install 'mmcl-edge[sign]'``); without keys nothing here is imported.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from mmcl_edge.errors import ConfigError, PackRejected

SIGNATURE_FILE = "signature.json"
SIGNATURE_SCHEMA = "mmcl-edge.signature/1"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
_CONTEXT = b"mmcl-edge pack signature v1\x00"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("signed packs need the 'cryptography' package: pip install 'mmcl-edge[sign]'") from None
    return serialization, ed25519


def _raw_public(key) -> bytes:
    serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def new_keypair(folder: Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub`` into ``folder``; never overwrites."""
    serialization, ed25519 = _crypto()
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for p in (private, public):
        if p.exists():
            raise ConfigError(f"{p} already exists; choose another --out folder (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: Path):
    serialization, ed25519 = _crypto()
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path} cannot be read ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(key):
    """A public key from a PEM file path, PEM bytes, or an Ed25519PublicKey object."""
    serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    where = "a key"
    if isinstance(key, (str, Path)):
        where = str(key)
        try:
            key = Path(key).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigError(f"trusted key {where} cannot be read ({exc})") from None
    try:
        pub = serialization.load_pem_public_key(key)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"trusted key {where} is not a PEM public key ({exc})") from None
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise ConfigError(f"trusted key {where} is not an Ed25519 key")
    return pub


def sign_pack(folder: Path, manifest: dict, private_key_path: Path) -> dict:
    """Write ``signature.json`` for the pack in ``folder`` (its manifest already written)."""
    key = load_private_key(private_key_path)
    sig = key.sign(_CONTEXT + manifest["sha256"].encode())
    body = {"schema": SIGNATURE_SCHEMA, "algorithm": "ed25519", "key_id": key_id(key.public_key()),
            "manifest_sha256": manifest["sha256"], "signature": base64.b64encode(sig).decode()}
    (Path(folder) / SIGNATURE_FILE).write_text(json.dumps(body, indent=2))
    return body


def verify_pack(folder: Path, manifest: dict, trusted: list) -> str:
    """Check ``signature.json`` against the trusted public keys; returns the signing key's id."""
    from cryptography.exceptions import InvalidSignature

    path = Path(folder) / SIGNATURE_FILE
    if not path.is_file():
        raise PackRejected(f"{folder}: the pack is not signed, and this runtime serves only packs signed by "
                           "a trusted key")
    try:
        body = json.loads(path.read_text())
        sig = base64.b64decode(body["signature"], validate=True)
        kid, signed = body["key_id"], body["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackRejected(f"{folder}: {SIGNATURE_FILE} is malformed ({exc})") from None
    if signed != manifest["sha256"]:
        raise PackRejected(f"{folder}: the signature is for another manifest (the manifest was changed after signing)")
    keys = {key_id(k): k for k in trusted}
    if kid not in keys:
        raise PackRejected(f"{folder}: signed by key {kid}, which is not one of the trusted keys "
                           f"({', '.join(keys) or 'none'})")
    try:
        keys[kid].verify(sig, _CONTEXT + manifest["sha256"].encode())
    except InvalidSignature:
        raise PackRejected(f"{folder}: the signature does not verify with trusted key {kid} (forged or corrupt)") from None
    return kid
