"""Ed25519 signatures over canonical manifests (supply-chain use), with the ``cryptography`` library.

``nilmc keygen`` writes a private key (PKCS#8 PEM, mode 0600) and its public key (PEM);
``nilmc compile --sign KEY`` writes ``manifest.sig`` beside every bundle's ``manifest.json``
(a small JSON record: algorithm, the public key's sha256 fingerprint, the base64 signature of
the manifest file's exact bytes); ``nilmc verify --trust PUBKEY`` accepts a bundle only when
that signature verifies under the trusted key. nilmc implements no cryptography itself.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nilmc.compiler.errors import BadInputError, MissingDependencyError
from nilmc.compiler.io import atomic_write_bytes, canonical_json_bytes, sha256_bytes

ALGORITHM = "ed25519"


class SignatureError(BadInputError):
    """A key or signature is missing, malformed or does not verify."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is a core dependency
        raise MissingDependencyError("cryptography", "all", "signing bundles") from None
    return serialization, ed25519


def _public_raw(public_key: Any) -> bytes:
    serialization, _ = _crypto()
    return bytes(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def fingerprint(public_key: Any) -> str:
    return sha256_bytes(_public_raw(public_key))


def keygen(prefix: str | Path) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (private, 0600) and ``PREFIX.pub``; refuses to overwrite either."""
    serialization, ed25519 = _crypto()
    prefix = Path(prefix)
    key_path, pub_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise BadInputError(f"{str(p)!r} already exists", "choose another --out prefix (nilmc never overwrites a key)")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(key_path, private)
    key_path.chmod(0o600)
    atomic_write_bytes(pub_path, public)
    return key_path, pub_path


@dataclass(frozen=True)
class Signer:
    key: Any

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        serialization, ed25519 = _crypto()
        return cls(_load_pem(path, "unencrypted PEM private key", lambda d: serialization.load_pem_private_key(d, password=None),
                             ed25519.Ed25519PrivateKey, "create one with nilmc keygen --out PREFIX"))

    def sign_file(self, manifest: Path, out: Path) -> Path:
        signature = self.key.sign(manifest.read_bytes())
        record = {"algorithm": ALGORITHM, "public_key_sha256": fingerprint(self.key.public_key()),
                  "signed_file": manifest.name, "signature": base64.b64encode(signature).decode("ascii")}
        return atomic_write_bytes(out, canonical_json_bytes(record))


@dataclass(frozen=True)
class TrustedKey:
    key: Any

    @classmethod
    def load(cls, path: str | Path) -> TrustedKey:
        serialization, ed25519 = _crypto()
        return cls(_load_pem(path, "PEM public key", serialization.load_pem_public_key, ed25519.Ed25519PublicKey,
                             "pass the .pub file written by nilmc keygen"))

    def check(self, manifest: Path, sig_path: Path) -> str | None:
        """None when ``sig_path`` is a valid signature of ``manifest`` by this key, else the reason."""
        from cryptography.exceptions import InvalidSignature

        if not sig_path.is_file():
            return f"{sig_path.name}: missing (the bundle is not signed)"
        try:
            record = json.loads(sig_path.read_text())
            signature = base64.b64decode(record["signature"], validate=True)
            algorithm = record["algorithm"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{sig_path.name}: malformed signature record"
        if algorithm != ALGORITHM:
            return f"{sig_path.name}: algorithm {algorithm!r}, expected {ALGORITHM}"
        try:
            self.key.verify(signature, manifest.read_bytes())
        except InvalidSignature:
            return f"{sig_path.name}: signature does not verify under the trusted key {fingerprint(self.key)[:16]}…"
        return None


def _load_pem(path: str | Path, what: str, loader: Any, want: type, remedy: str) -> Any:
    """An Ed25519 key of type ``want`` from a PEM file, or a :class:`SignatureError` saying what the file is instead."""
    data = _read_key_file(path, "public key" if "public" in what else "private key")
    try:
        key = loader(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{str(path)!r} is not a readable {what} ({exc})", remedy) from None
    if not isinstance(key, want):
        raise SignatureError(f"{str(path)!r} is a {type(key).__name__}, not an Ed25519 key", remedy)
    return key


def _read_key_file(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"{what} {str(p)!r} does not exist or is not a file", "create a key pair with nilmc keygen --out PREFIX")
    data = p.read_bytes()
    if len(data) > 16384:
        raise SignatureError(f"{what} {str(p)!r} is {len(data)} bytes, too large for a key", "pass the file written by nilmc keygen")
    return data
