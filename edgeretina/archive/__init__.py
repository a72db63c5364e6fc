"""Archive grading on Ray Data: `edgeretina grade-archive`, a whole archive of photographs (or DICOM) graded by a
pool of Ray actors, one Grader each, on this machine or a cluster, resumable, into Parquet.

Built on the runtime, never imported by it. One file per concern: ``config`` (ArchiveConfig), ``sources`` (what
is graded, and the key that says whether it is done), ``rows`` (the Parquet schema: a grade record flattened),
``worker`` (the actor: bundle verified on its machine, then rows), ``parts`` (part files, resume state, the
merged results), ``cluster`` (starting or joining Ray, quietly), ``summary`` (counts) and ``run`` (the flow).

Ray and pyarrow (the [scale] extra) are imported only by ``grade_archive``, never by importing this package, so
`edgeretina --help` does not load them; ``require_extra()`` names the extra when one is missing.
"""

from __future__ import annotations

import importlib

from edgeretina.archive.config import ArchiveConfig
from edgeretina.errors import MissingDependencyError

# (module, package to install)
_EXTRA = (("ray", "ray[data]"), ("ray.data", "ray[data]"), ("pyarrow", "pyarrow"))

__all__ = ["ArchiveConfig", "grade_archive", "require_extra"]


def require_extra() -> None:
    """Raise MissingDependencyError naming the [scale] extra when one of its packages is not installed."""
    for module, package in _EXTRA:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependencyError(package, "scale", "edgeretina grade-archive") from None


def grade_archive(config: ArchiveConfig, on_progress=None, log=None):
    """Grade an archive (see run.run_archive); returns the ArchiveSummary also written to OUT/summary.json."""
    require_extra()
    from edgeretina.archive.run import run_archive

    return run_archive(config, on_progress=on_progress, log=log)
