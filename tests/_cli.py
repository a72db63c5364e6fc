"""Run `edgeretina ARGS...` in this process: the installed script's own main(), with its real argument
parsing, lazy imports and error-to-exit-code mapping, without paying torch's import again per command."""

from __future__ import annotations

import contextlib
import io
import os
import sys


def run_cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `edgeretina ARGS...`; sys.argv, EDGERETINA_DEBUG and torch's thread
    count (which --threads sets process-wide) are restored afterwards."""
    import torch

    from edgeretina.cli import main

    saved_argv, saved_debug, threads = sys.argv, os.environ.pop("EDGERETINA_DEBUG", None), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = ["edgeretina", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        if saved_debug is not None:
            os.environ["EDGERETINA_DEBUG"] = saved_debug
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()
