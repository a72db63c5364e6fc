"""Inference backends: one runner per backend behind one interface (base), the registry of what exists
and what is installed (registry), and which backend and artifact grade a bundle (selection)."""

from edgeretina.runtime.backends.base import Runner
from edgeretina.runtime.backends.registry import (create_runner, formats_for, installed_backends, is_installed,
                                                  registered_backends)
from edgeretina.runtime.backends.selection import model_artifact, pick_backend, rank_backends

__all__ = ["Runner", "create_runner", "formats_for", "installed_backends", "is_installed", "registered_backends",
           "model_artifact", "pick_backend", "rank_backends"]
