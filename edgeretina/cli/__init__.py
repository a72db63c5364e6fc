"""The `edgeretina` command. Each command parses, calls one library function and prints.

Heavy packages (torch, open_clip, onnx) are imported inside the commands that need them, so
`edgeretina grade` starts fast on a device without torch. Errors become one line and exit code 1;
set EDGERETINA_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from edgeretina import __version__
from edgeretina.errors import EdgeRetinaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Diabetic-retinopathy grading from training to a portable fundus camera.")


def _register() -> None:
    from edgeretina.cli import (bank, bench, build_engine, calibrate, demo, evaluate, evaluate_saliency,  # noqa: F401
                                explain, export, grade, grade_archive, info, serve, sign, synth, train, verify,
                                watch)  # (commands register themselves)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgeretina {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _is_usage_error(exc: Exception) -> bool:
    """click's ClickException, whichever click raised it: typer >= 0.2x vendors its own copy (typer._click),
    which is not the `click` package's class, so an isinstance check on one of them misses the other."""
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__) and hasattr(exc, "show")


def main() -> None:
    _register()
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of exiting.
        code = app(standalone_mode=False)
    except EdgeRetinaError as exc:
        if os.environ.get("EDGERETINA_DEBUG"):
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # usage errors arrive here in non-standalone mode
        if _is_usage_error(exc):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
