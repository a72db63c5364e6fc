"""DICOM test files: the writers of `edgeretina.phantom.dicom_files` (fundus-camera DICOM from phantom
photographs, each carrying a fake patient), and the pydicom names the tests use beside them. Importing this
module skips the importing test module when pydicom is not installed."""

from __future__ import annotations

import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.encaps import encapsulate  # noqa: E402,F401
from pydicom.pixels import convert_color_space  # noqa: E402,F401
from pydicom.uid import JPEGBaseline8Bit  # noqa: E402,F401

from edgeretina.phantom.dicom_files import (  # noqa: E402,F401
    COMPREHENSIVE_SR, ENCAPSULATED_PDF, GRAYSCALE_PRESENTATION_STATE, OCT_VOLUME, OPHTHALMIC_8BIT, OPHTHALMIC_16BIT,
    PATIENT, encode_lossless_jpeg, header, image_dataset, jpeg_bytes, no_pixels_dataset, pdf_dataset,
    per_frame_laterality, save, sr_dataset, to_bytes, uids)
