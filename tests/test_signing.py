"""Signed bundles: Ed25519 over manifest.json, enforced by the runtime when a trust list is configured.

Real keys and real signatures (cryptography), the session's tiny ONNX bundle, no mocks.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgeretina.bundle import MANIFEST_NAME, load_bundle, zip_bundle
from edgeretina.dataset import read_labels
from edgeretina.errors import BundleError, ConfigError, SignatureError
from edgeretina.runtime.grader import Grader
from edgeretina.runtime.info import format_info, inspect_bundle
from edgeretina.signing import (SIGNATURE_NAME, TRUST_ENV, TrustList, check_signature, enforce_trust,
                                generate_keypair, key_id, sign_bundle)


@pytest.fixture(autouse=True)
def no_ambient_trust(monkeypatch, tmp_path):
    """Keep the developer's own trust list (env var or ~/.config) out of every test."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def bundle_copy(onnx_bundle, tmp_path):
    return Path(shutil.copytree(onnx_bundle, tmp_path / "bundle"))


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: "signer" (on the trust list) and "stranger" (not on it)."""
    pairs = {}
    for name in ("signer", "stranger"):
        private, public = tmp_path / "keys" / f"{name}.pem", tmp_path / "keys" / f"{name}.pub.pem"
        pairs[name] = (private, public, generate_keypair(private, public))
    return pairs


@pytest.fixture
def photo(phantom_test):
    return read_labels(phantom_test)[0].path


def _trust(keys, name="signer") -> TrustList:
    return TrustList.load(keys[name][1])


def _edit_manifest(root: Path) -> None:
    """Change one value in manifest.json, keep it valid JSON (and the artifacts untouched)."""
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["grading"]["referable_threshold"] = 0.001
    path.write_text(json.dumps(data, indent=2))


def test_signed_bundle_grades_under_its_trust_list(bundle_copy, keys, photo):
    written = sign_bundle(bundle_copy, keys["signer"][0])
    assert written == bundle_copy / SIGNATURE_NAME
    document = json.loads(written.read_text())
    assert document["format"] == "edgeretina-signature/1" and document["algorithm"] == "ed25519"
    assert document["key_id"] == keys["signer"][2] and document["signed_file"] == MANIFEST_NAME
    assert len(base64.b64decode(document["signature"])) == 64
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    assert SIGNATURE_NAME not in [a["file"] for a in manifest["artifacts"]]   # not circular

    grader = Grader(bundle_copy, trust=_trust(keys))
    assert grader.signature.trusted is True and grader.signature.key_id == keys["signer"][2]
    [record] = grader.grade([photo])
    assert record.error is None and record.grade is not None


def test_tampered_manifest_is_refused(bundle_copy, keys):
    sign_bundle(bundle_copy, keys["signer"][0])
    _edit_manifest(bundle_copy)
    load_bundle(bundle_copy)                      # the hashes still match: only the signature catches it
    with pytest.raises(SignatureError) as caught:
        Grader(bundle_copy, trust=_trust(keys))
    message = str(caught.value)
    assert "signature" in message and "manifest.json changed after it was signed" in message
    assert keys["signer"][2] in message and str(bundle_copy) in message


def test_unsigned_bundle_is_refused_under_a_trust_list(bundle_copy, keys):
    with pytest.raises(SignatureError, match="is not signed.*edgeretina sign"):
        Grader(bundle_copy, trust=_trust(keys))


def test_signature_by_a_key_not_on_the_list_is_refused_naming_the_key(bundle_copy, keys):
    sign_bundle(bundle_copy, keys["stranger"][0])
    with pytest.raises(SignatureError) as caught:
        enforce_trust(bundle_copy, _trust(keys))
    assert keys["stranger"][2] in str(caught.value) and "not on the trust list" in str(caught.value)


def test_malformed_signature_file_is_refused(bundle_copy, keys):
    sign_bundle(bundle_copy, keys["signer"][0])
    path = bundle_copy / SIGNATURE_NAME
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "signature": "not base64!"}))
    with pytest.raises(SignatureError, match="malformed signature.json"):
        enforce_trust(bundle_copy, _trust(keys))
    path.write_text("{ torn")
    with pytest.raises(SignatureError, match="malformed signature.json"):
        enforce_trust(bundle_copy, _trust(keys))


def test_forged_signature_bytes_are_refused(bundle_copy, keys):
    sign_bundle(bundle_copy, keys["signer"][0])
    path = bundle_copy / SIGNATURE_NAME
    document = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(document["signature"]))
    raw[0] ^= 1
    path.write_text(json.dumps({**document, "signature": base64.b64encode(bytes(raw)).decode()}))
    with pytest.raises(SignatureError, match="does not verify"):
        enforce_trust(bundle_copy, _trust(keys))


def test_without_a_trust_list_nothing_is_required(bundle_copy, keys, photo):
    assert TrustList.from_environment() is None
    grader = Grader(bundle_copy)                   # default: the environment, which configures nothing
    assert grader.signature.signed is False and grader.signature.trusted is None
    assert grader.grade([photo])[0].error is None
    sign_bundle(bundle_copy, keys["stranger"][0])
    status = check_signature(bundle_copy, None)
    assert status.signed and status.trusted is None and "not checked: no trust list" in status.reason
    assert Grader(bundle_copy, trust=None).signature.key_id == keys["stranger"][2]


def test_environment_variable_is_honoured(bundle_copy, keys, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(keys["signer"][1]))
    with pytest.raises(SignatureError, match="is not signed"):
        Grader(bundle_copy)
    sign_bundle(bundle_copy, keys["signer"][0])
    assert Grader(bundle_copy).signature.trusted is True


def test_config_location_is_the_default_trust_list(bundle_copy, keys, tmp_path):
    trusted = tmp_path / "xdg" / "edgeretina" / "trusted_keys"
    trusted.mkdir(parents=True)
    shutil.copy(keys["signer"][1], trusted / "signer.pub.pem")
    trust = TrustList.from_environment()
    assert trust is not None and keys["signer"][2] in trust
    with pytest.raises(SignatureError):
        Grader(bundle_copy)


@pytest.mark.parametrize("kind", ["empty folder", "empty file", "missing"])
def test_configured_trust_path_without_keys_is_an_error(kind, tmp_path, monkeypatch):
    path = tmp_path / "trust"
    if kind == "empty folder":
        path.mkdir()
    elif kind == "empty file":
        path.write_text("# no keys yet\n")
    monkeypatch.setenv(TRUST_ENV, str(path))
    with pytest.raises(ConfigError, match="holds no public keys" if kind != "missing" else "does not exist"):
        TrustList.from_environment()


def test_private_key_on_a_trust_list_is_an_error(keys, tmp_path):
    folder = tmp_path / "trust"
    folder.mkdir()
    shutil.copy(keys["signer"][0], folder)
    with pytest.raises(ConfigError, match="private key"):
        TrustList.load(folder)


def test_bundle_with_a_modified_artifact_is_not_signed(bundle_copy, keys):
    artifact = load_bundle(bundle_copy).manifest.artifact("model").file
    with open(bundle_copy / artifact, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="bundle verification failed"):
        sign_bundle(bundle_copy, keys["signer"][0])
    assert not (bundle_copy / SIGNATURE_NAME).exists()


def test_zipped_bundle_sign_and_verify(bundle_copy, keys, photo, tmp_path):
    archive = zip_bundle(bundle_copy, tmp_path / "bundle.zip")
    assert sign_bundle(archive, keys["signer"][0]) == archive
    with zipfile.ZipFile(archive) as zf:
        assert SIGNATURE_NAME in zf.namelist() and MANIFEST_NAME in zf.namelist()
    assert check_signature(archive, _trust(keys)).trusted is True
    assert Grader(archive, trust=_trust(keys)).grade([photo])[0].error is None
    with pytest.raises(SignatureError) as caught:
        Grader(archive, trust=_trust(keys, "stranger"))
    assert str(archive) in str(caught.value) and keys["signer"][2] in str(caught.value)


def test_trust_list_reads_ssh_ed25519_lines_and_several_pem_blocks(keys, tmp_path):
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(keys["stranger"][1].read_bytes())
    ssh_line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert ssh_line.startswith("ssh-ed25519 ")
    listing = tmp_path / "trusted_keys"
    listing.write_text(f"# devices in ward 3\n{ssh_line} release@build-host\n\n"
                       + keys["signer"][1].read_text() + keys["signer"][1].read_text())
    trust = TrustList.load(listing)
    assert set(trust.keys) == {keys["signer"][2], keys["stranger"][2]}
    assert key_id(public) == keys["stranger"][2]
    assert keys["signer"][2].startswith("sha256:") and len(keys["signer"][2]) == len("sha256:") + 32


def test_trust_list_rejects_other_key_types(tmp_path):
    listing = tmp_path / "trusted_keys"
    listing.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ user@host\n")
    with pytest.raises(ConfigError, match="ssh-ed25519"):
        TrustList.load(listing)


def test_private_key_is_written_owner_only(keys):
    assert stat.S_IMODE(keys["signer"][0].stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in keys["signer"][0].read_bytes()
    assert b"BEGIN PUBLIC KEY" in keys["signer"][1].read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(keys["signer"][0], keys["signer"][1])


def test_info_shows_the_signature_and_counts_a_refused_one(bundle_copy, keys):
    info = inspect_bundle(bundle_copy, trust=None)
    assert info.verified and "signature  - unsigned" in format_info(info)
    sign_bundle(bundle_copy, keys["signer"][0])
    info = inspect_bundle(bundle_copy, trust=_trust(keys))
    assert info.verified and f"signature  ✓ signed by trusted key {keys['signer'][2]}" in format_info(info)
    assert info.to_dict()["signature"]["trusted"] is True
    info = inspect_bundle(bundle_copy, trust=_trust(keys, "stranger"))
    assert not info.verified and "not on the trust list" in info.problems[0]
    with pytest.raises(BundleError):
        info.raise_if_tampered()


def _cli(*args, env_extra=None):
    exe = Path(sys.executable).with_name("edgeretina")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    env.pop("EDGERETINA_DEBUG", None)
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)


def test_cli_keygen_sign_grade_with_trust(bundle_copy, photo, tmp_path):
    key = tmp_path / "cli" / "release.pem"
    made = _cli("keygen", "--out", key)
    assert made.returncode == 0, made.stderr
    public = key.with_name("release.pub.pem")
    assert public.is_file() and "key id      sha256:" in made.stdout

    refused = _cli("grade", photo, "--bundle", bundle_copy, "--trust", public)
    assert refused.returncode == 1 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not signed" in lines[0], refused.stderr

    signed = _cli("sign", bundle_copy, "--key", key)
    assert signed.returncode == 0, signed.stderr
    [kid] = TrustList.load(public).keys
    assert kid in signed.stdout

    graded = _cli("grade", photo, "--bundle", bundle_copy, "--trust", public, "--json")
    assert graded.returncode == 0, graded.stderr
    assert json.loads(graded.stdout)[0]["error"] is None

    _edit_manifest(bundle_copy)
    tampered = _cli("grade", photo, "--bundle", bundle_copy, env_extra={TRUST_ENV: str(public)})
    lines = tampered.stderr.strip().splitlines()
    assert tampered.returncode == 1 and len(lines) == 1 and "signature" in lines[0] and kid in lines[0]

    info = _cli("info", bundle_copy, "--trust", public)
    assert info.returncode == 1 and "signature  ✗" in info.stdout
