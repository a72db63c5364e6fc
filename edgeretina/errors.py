"""One error hierarchy. The library raises these; only the CLI turns them into a line and an exit code."""


class EdgeRetinaError(Exception):
    """Base of every error edgeretina raises on purpose."""


class ConfigError(EdgeRetinaError):
    """A configuration value or combination of options is invalid."""


class ImageDecodeError(EdgeRetinaError):
    """A file could not be read as an image (empty, truncated, not an image, unsupported)."""


class DicomError(ImageDecodeError):
    """A DICOM file holds nothing edgeretina can grade: a document or report instead of an image, no pixel
    data, an unsupported transfer syntax or photometric interpretation, or a truncated or corrupt file.

    ``dicom``: the identifiers a grading record may carry (laterality, study/series/SOP instance UIDs)
    when the header was readable, else None; never patient data."""

    def __init__(self, message: str, dicom: dict | None = None):
        self.dicom = dicom
        super().__init__(message)


class UngradableImageError(EdgeRetinaError):
    """The quality gate refused the photo: there is no grade to explain."""


class DatasetError(EdgeRetinaError):
    """A dataset (labels.csv and its images) is missing, malformed or unusable."""


class CheckpointError(EdgeRetinaError):
    """A training checkpoint is missing, malformed or from an incompatible version."""


class BundleError(EdgeRetinaError):
    """An exported bundle is missing files, tampered with, or of an unknown schema."""


class SignatureError(BundleError):
    """A bundle is not trusted under the configured trust list: unsigned, unknown key, bad or broken signature."""


class VerificationError(BundleError):
    """The bundle's model does not reproduce its reference outputs on this device (`edgeretina verify`)."""


class ExportError(EdgeRetinaError):
    """Exporting a model failed."""


class GateError(ExportError):
    """An exported artifact disagrees with the torch reference beyond the gate's thresholds."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        super().__init__("export gate failed: " + "; ".join(self.failures))


class BackendError(EdgeRetinaError):
    """An inference backend is unavailable or failed to run the model."""


class MissingDependencyError(EdgeRetinaError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        self.package = package
        self.extra = extra
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{what}: pip install 'edgeretina[{extra}]'")


class StoreError(EdgeRetinaError):
    """The results store (SQLite under the data folder) cannot be opened or written: not a database, damaged,
    a schema this version does not know, or a picture that could not be put beside its row."""


class ServeError(EdgeRetinaError):
    """The grading service cannot serve a request: its queue is full, it is shutting down, the grader is not
    loaded, or a request timed out. (Invalid service options, the API key rule included, are ConfigErrors.)"""


class ArchiveError(EdgeRetinaError):
    """Grading an archive on Ray failed as a whole: no images in the sources, the output folder is held by another
    run, the cluster cannot host the workers asked for, or a worker refused the bundle on its machine (the
    message names the machine and the reason). A failed image is never this: it is a row with its error."""
