from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeretina.cli import app


@app.command(epilog="Example: edgeretina keygen --out keys/site-a.pem")
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Private key file to write (KEY.pem); "
                                                         "the public key goes to KEY.pub.pem beside it.")],
) -> None:
    """Make an Ed25519 signing key pair for bundles. Keep KEY.pem secret; put KEY.pub.pem on the devices' trust list."""
    from edgeretina.signing import generate_keypair, public_key_path_for

    public = public_key_path_for(out)
    kid = generate_keypair(out, public)
    typer.echo(f"private key {out} (keep it secret)\npublic key  {public}\nkey id      {kid}")


@app.command(epilog="Example: edgeretina sign bundle-cpu --key keys/site-a.pem")
def sign(
    bundle: Annotated[Path, typer.Argument(help="Exported bundle directory or .zip.")],
    key: Annotated[Path, typer.Option("--key", "-k", help="Ed25519 private key (PEM PKCS#8, from keygen).")],
) -> None:
    """Sign a bundle's manifest.json (which holds every artifact's sha256); writes signature.json into the bundle."""
    from edgeretina.signing import check_signature, sign_bundle

    written = sign_bundle(bundle, key)
    status = check_signature(bundle, None)
    typer.echo(f"signed {bundle} with key {status.key_id} ({written})")
