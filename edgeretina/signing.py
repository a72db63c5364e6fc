"""Signed bundles: an Ed25519 signature over manifest.json, checked against the device's trust list.

manifest.json holds every artifact's size and sha256, so a signature over its exact bytes covers the
artifacts too, as long as the bundle was loaded strictly (``load_bundle(verify=True)`` checks the
artifacts against the manifest). The signature lives in ``signature.json`` beside the manifest. It is not
an artifact listed in the manifest, because the manifest cannot list its own signature.

Keys: a private key is PEM PKCS#8 (unencrypted, file mode 0600) and a public key is PEM
SubjectPublicKeyInfo. A trust list also accepts OpenSSH ``ssh-ed25519 AAAA... comment`` lines. A key id
is "sha256:" followed by the first 16 bytes (32 hex digits) of the sha256 of the raw 32-byte public key.

Trust: when no trust list is configured, nothing is required. When one is configured, a bundle must
carry a signature by one of its keys that verifies over the current manifest.json. A configured trust
list that is missing or holds no keys is an error. It never falls back to "trust everything".

``cryptography`` is imported inside the functions that need it, so importing this module costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edgeretina.atomic import write_bytes_atomic, write_json_atomic
from edgeretina.bundle import MANIFEST_NAME, Bundle, Manifest, load_bundle, zip_bundle
from edgeretina.errors import BundleError, ConfigError, MissingDependencyError, SignatureError

SIGNATURE_NAME = "signature.json"
SIGNATURE_FORMAT = "edgeretina-signature/1"
ALGORITHM = "ed25519"
TRUST_ENV = "EDGERETINA_TRUST"
ENVIRONMENT = "environment"          # the `trust` argument that means "whatever this process is configured with"
KEY_ID_BYTES = 16                    # a key id shows this many leading bytes of sha256(raw public key)
_SIGNATURE_BYTES = 64
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)


def _crypto():
    """cryptography's serialization and ed25519 modules, or an error that says how to install them."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError("cryptography", "sign", "signed bundles") from None
    return serialization, ed25519


# ---------------------------------------------------------------------------------------------- keys


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair and return its key id.

    The private key is written as unencrypted PEM PKCS#8 with mode 0600, the public key as PEM
    SubjectPublicKeyInfo. Raises ConfigError when either file already exists, so a signing key is never
    overwritten.
    """
    serialization, ed25519 = _crypto()
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists: remove it or choose another path")
    private_key = ed25519.Ed25519PrivateKey.generate()
    public_key = private_key.public_key()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(private_path, private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
    write_bytes_atomic(public_path, public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(public_key)


def public_key_path_for(private_path: str | os.PathLike) -> Path:
    """The public key file that goes with a private key file: KEY.pem -> KEY.pub.pem."""
    private_path = Path(private_path)
    stem = private_path.stem if private_path.suffix == ".pem" else private_path.name
    return private_path.with_name(stem + ".pub.pem")


def key_id(public_key: Any) -> str:
    """A short, stable fingerprint of an Ed25519 public key: "sha256:" + 32 hex digits (16 bytes)."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[: 2 * KEY_ID_BYTES]


def _load_private_key(path: str | os.PathLike):
    from cryptography.exceptions import UnsupportedAlgorithm

    serialization, ed25519 = _crypto()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"private key {path} is encrypted; edgeretina signs with unencrypted PKCS#8 keys "
                          "(make one with `edgeretina keygen`)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not a PEM private key (make one with `edgeretina keygen`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"private key {path} is not an Ed25519 key (make one with `edgeretina keygen`)")
    return key


# ------------------------------------------------------------------------------------------- signing


def sign_bundle(bundle_path: str | os.PathLike, private_key_path: str | os.PathLike) -> Path:
    """Sign the exact bytes of a bundle's manifest.json with an Ed25519 key and write signature.json beside it.

    The bundle is first loaded strictly, so a bundle whose artifacts no longer match their manifest is never
    signed. An existing signature is replaced. A zipped bundle is rewritten atomically with signature.json
    added. Returns the signature file of a bundle directory, or the rewritten zip.
    Raises BundleError when the bundle fails verification, and ConfigError when the key is unusable.
    """
    private_key = _load_private_key(private_key_path)
    source = Path(bundle_path)
    bundle = load_bundle(source)
    manifest_bytes = (bundle.root / MANIFEST_NAME).read_bytes()
    signature_path = write_json_atomic(bundle.root / SIGNATURE_NAME, _signature_document(private_key, manifest_bytes))
    if source.is_file():
        return zip_bundle(bundle.root, source)
    return signature_path


def _signature_document(private_key, manifest_bytes: bytes) -> dict[str, str]:
    return {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signed_file": MANIFEST_NAME,
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii"),
        "signed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------- trust list


class TrustList:
    """The Ed25519 public keys whose bundle signatures a device accepts, indexed by key id."""

    def __init__(self, keys: Iterable[Any], source: str | os.PathLike = "<in memory>"):
        self.keys = {key_id(key): key for key in keys}
        self.source = str(source)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, kid: str) -> bool:
        return kid in self.keys

    def __repr__(self) -> str:
        return f"TrustList({len(self)} key(s) from {self.source})"

    def get(self, kid: str):
        return self.keys.get(kid)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrustList":
        """Read a trust list from a file or from a folder of files. Files in a folder whose names start
        with "." are skipped.

        A file holds PEM public keys (any number of blocks) and/or OpenSSH ``ssh-ed25519`` lines. Blank
        lines and lines starting with ``#`` are ignored. Raises ConfigError when the path does not exist,
        holds no key, or holds anything that is not an Ed25519 public key (a private key included).
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise ConfigError(f"trust list {path} does not exist")
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if path.is_dir() else [path]
        keys = [key for file in files for key in _read_public_keys(file)]
        if not keys:
            raise ConfigError(f"trust list {path} holds no public keys: add a KEY.pub.pem from `edgeretina keygen` "
                              "or an ssh-ed25519 line")
        return cls(keys, source=path)

    @classmethod
    def from_environment(cls) -> "TrustList | None":
        """The trust list this process is configured with, or None when none is configured.

        Reads $EDGERETINA_TRUST (a file or folder) when it is set. Otherwise it reads
        $XDG_CONFIG_HOME/edgeretina/trusted_keys (default ~/.config/edgeretina/trusted_keys) when that
        path exists. Raises ConfigError when the configured path is missing or holds no keys.
        """
        path = configured_trust_path()
        return cls.load(path) if path is not None else None


def configured_trust_path() -> Path | None:
    """Where this process's trust list is: $EDGERETINA_TRUST, else the XDG config location if it exists."""
    explicit = os.environ.get(TRUST_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"   # XDG: ignore relative
    default = base / "edgeretina" / "trusted_keys"
    return default if default.exists() else None


def resolve_trust(trust: "TrustList | str | os.PathLike | None") -> TrustList | None:
    """Turn a ``trust`` argument into a trust list.

    "environment" gives TrustList.from_environment(). A path gives TrustList.load(path). A TrustList is
    returned as it is. None gives None, meaning no signature is required.
    """
    if trust is None or isinstance(trust, TrustList):
        return trust
    if isinstance(trust, str) and trust == ENVIRONMENT:
        return TrustList.from_environment()
    return TrustList.load(trust)


def _read_public_keys(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trust list file {path}: {exc}") from None
    keys = [_pem_public_key(path, match.group(0), match.group(1)) for match in _PEM_BLOCK.finditer(text)]
    outside_pem = _PEM_BLOCK.sub(lambda match: "\n" * match.group(0).count("\n"), text)   # keeps line numbers
    for number, line in enumerate(outside_pem.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_ssh_public_key(path, number, line))
    return keys


def _pem_public_key(path: Path, block: str, label: str):
    from cryptography.exceptions import UnsupportedAlgorithm

    serialization, _ = _crypto()
    if "PRIVATE" in label:
        raise ConfigError(f"trust list file {path} holds a private key; a trust list holds public keys only "
                          "(the KEY.pub.pem that `edgeretina keygen` writes)")
    try:
        key = serialization.load_pem_public_key(block.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"trust list file {path}: unreadable PEM public key ({exc})") from None
    return _require_ed25519(key, f"{path}")


def _ssh_public_key(path: Path, number: int, line: str):
    from cryptography.exceptions import UnsupportedAlgorithm

    serialization, _ = _crypto()
    where = f"{path}:{number}"
    if not line.startswith("ssh-ed25519 "):
        raise ConfigError(f"trust list file {where}: expected a PEM public key or an ssh-ed25519 line, "
                          f"got {line[:40]!r}")
    try:
        key = serialization.load_ssh_public_key(line.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as exc:
        raise ConfigError(f"trust list file {where}: unreadable ssh-ed25519 key ({exc})") from None
    return _require_ed25519(key, where)


def _require_ed25519(key, where: str):
    _, ed25519 = _crypto()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"trust list file {where}: not an Ed25519 public key ({type(key).__name__})")
    return key


# ------------------------------------------------------------------------------------------ checking


@dataclass(frozen=True)
class SignatureStatus:
    signed: bool            # the bundle carries a signature file
    key_id: str | None      # the key the signature file names (proven only when trusted is True)
    trusted: bool | None    # True: verified with a trusted key; False: refused; None: no trust list to check with
    reason: str             # one line for people, naming the bundle, the key and the fix when refused


@dataclass(frozen=True)
class _SignatureFile:
    key_id: str
    signature: bytes
    manifest_sha256: str


def check_signature(bundle: Bundle | str | os.PathLike, trust: TrustList | None, *,
                    name: str | None = None) -> SignatureStatus:
    """Report whether a bundle is signed and, when there is a trust list, whether the signature verifies
    with a trusted key over the current manifest.json.

    This function does not raise for a bad signature; the status says so. ``bundle`` is a loaded Bundle or
    a path, and a path is loaded strictly. ``name`` is how messages refer to the bundle (default: its path).
    """
    if not isinstance(bundle, Bundle):
        name = name or str(bundle)
        bundle = load_bundle(bundle)
    name = name or str(bundle.root)
    signature_path = bundle.root / SIGNATURE_NAME
    if not signature_path.exists():
        return _unsigned_status(name, trust)
    try:
        signature = _read_signature_file(signature_path)
    except ValueError as exc:
        return SignatureStatus(True, None, None if trust is None else False,
                               f"bundle {name} has a malformed {SIGNATURE_NAME} ({exc}): re-sign it with "
                               f"`edgeretina sign {name} --key KEY.pem`")
    if trust is None:
        return SignatureStatus(True, signature.key_id, None,
                               f"signed by key {signature.key_id}, not checked: no trust list")
    return _verify(bundle, name, signature, trust)


def enforce_trust(bundle: Bundle | str | os.PathLike, trust: TrustList | None, *,
                  name: str | None = None) -> SignatureStatus:
    """Require a valid signature by a trusted key when a trust list is given. Returns the status.

    When ``trust`` is None, nothing is required. When it is a trust list, SignatureError is raised for an
    unsigned bundle, a signature by a key not on the list, a malformed signature file, and a signature
    that does not verify over the current manifest.json. The error's reason names the bundle, the key id
    and how to fix it. The signature covers the artifacts only through their sha256 in the manifest, so
    pass a bundle loaded with ``verify=True`` (or a path, which is loaded that way).
    """
    status = check_signature(bundle, trust, name=name)
    if status.trusted is False:
        raise SignatureError(status.reason)
    return status


def _unsigned_status(name: str, trust: TrustList | None) -> SignatureStatus:
    if trust is None:
        return SignatureStatus(False, None, None, "unsigned (no trust list configured)")
    return SignatureStatus(False, None, False,
                           f"bundle {name} is not signed, and the trust list {trust.source} requires a signature: "
                           f"sign it with `edgeretina sign {name} --key KEY.pem` using a key on the trust list")


def _read_signature_file(path: Path) -> _SignatureFile:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not readable JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    for field, expected in (("format", SIGNATURE_FORMAT), ("algorithm", ALGORITHM), ("signed_file", MANIFEST_NAME)):
        if document.get(field) != expected:
            raise ValueError(f"{field} is {document.get(field)!r}, expected {expected!r}")
    kid, digest = document.get("key_id"), document.get("manifest_sha256")
    if not isinstance(kid, str) or not kid.startswith("sha256:"):
        raise ValueError("key_id is missing or not a sha256 key id")
    if not isinstance(digest, str):
        raise ValueError("manifest_sha256 is missing")
    return _SignatureFile(key_id=kid, signature=_decode_signature(document.get("signature")), manifest_sha256=digest)


def _decode_signature(value: Any) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except binascii.Error:
        raw = b""
    if len(raw) != _SIGNATURE_BYTES:
        raise ValueError(f"signature is not a base64 Ed25519 signature ({_SIGNATURE_BYTES} bytes)")
    return raw


def _verify(bundle: Bundle, name: str, signature: _SignatureFile, trust: TrustList) -> SignatureStatus:
    kid = signature.key_id
    public_key = trust.get(kid)
    if public_key is None:
        return SignatureStatus(True, kid, False,
                               f"bundle {name} is signed by key {kid}, which is not on the trust list {trust.source} "
                               f"({len(trust)} key(s)): add that public key to the trust list if you trust it, "
                               "or re-sign the bundle with a trusted key")
    manifest_bytes = (bundle.root / MANIFEST_NAME).read_bytes()
    if not _signature_verifies(public_key, signature.signature, manifest_bytes):
        changed = hashlib.sha256(manifest_bytes).hexdigest() != signature.manifest_sha256
        why = "manifest.json changed after it was signed" if changed else "the signature bytes do not match"
        return SignatureStatus(True, kid, False,
                               f"signature of bundle {name} by key {kid} does not verify over its {MANIFEST_NAME} "
                               f"({why}): the bundle was altered; export it again or get it from a trusted source")
    if not _describes(manifest_bytes, bundle.manifest):
        return SignatureStatus(True, kid, False,
                               f"bundle {name}: {MANIFEST_NAME} changed after the bundle was loaded, so the signature "
                               "does not cover what was loaded; load the bundle again")
    return SignatureStatus(True, kid, True, f"signed by trusted key {kid} (trust list {trust.source})")


def _signature_verifies(public_key, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _describes(manifest_bytes: bytes, manifest: Manifest) -> bool:
    """Whether the signed bytes are the manifest held in memory (the file may change after loading)."""
    try:
        return Manifest.from_dict(json.loads(manifest_bytes)) == manifest
    except (ValueError, AttributeError, BundleError):
        return False


__all__ = ["SIGNATURE_NAME", "TRUST_ENV", "SignatureStatus", "TrustList", "check_signature", "configured_trust_path",
           "enforce_trust", "generate_keypair", "key_id", "public_key_path_for", "resolve_trust", "sign_bundle"]
