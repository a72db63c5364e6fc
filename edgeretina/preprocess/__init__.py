"""The one preprocessing of edgeretina: decode, field of view, crop, Ben Graham, resize, normalise.

Training data loading, calibration, export parity checks and the on-device runtime all call this
package, so a model always sees pixels prepared the same way. It needs numpy, OpenCV and Pillow
(DICOM: pydicom and its plugins, the ``dicom`` extra, imported on first use).

Coordinates. Every position (``FieldOfView.cx``, ``Geometry.crop_box`` ...) is in *continuous*
pixel coordinates of the decoded image: the image covers ``[0, W] x [0, H]``, and the pixel in row
``i``, column ``j`` covers ``[j, j + 1) x [i, i + 1)``, so its centre is ``(j + 0.5, i + 0.5)``.
The same convention holds for the model's input square, so mapping between the two is one scale
and one offset per axis, with no half-pixel fudge anywhere.

Pipeline (``prepare``): detect the circular field of view (FOV) on a small copy; cut the square
circumscribing the circle out of the photo (rounded to whole pixels, padded with black where the
circle leaves the image); resize it to ``image_size`` (``INTER_AREA`` when shrinking); optionally
subtract the local average (Ben Graham); zero everything outside the circle. Ben Graham runs
*after* the resize, at the model resolution: it is ~40x cheaper there, and its sigma is defined as
a fraction of ``image_size`` anyway.

The package keeps one file per concern: ``config`` (PreprocessConfig), ``decode`` and ``formats``
(files to RGB arrays), ``dicom`` (DICOM files to RGB frames and the tags a record may carry), ``sources``
(what is graded: a photograph, or one frame of a DICOM), ``files`` (which files of a folder are images),
``fov`` (field of view), ``transform`` (prepare, normalize) and ``geometry`` (mapping between the model
input and the photo).
Import the public names from here.
"""

from edgeretina.preprocess.config import CLIP_MEAN, CLIP_STD, PreprocessConfig
from edgeretina.preprocess.decode import MAX_PIXELS, decode_image
from edgeretina.preprocess.files import is_image_file, list_images
from edgeretina.preprocess.fov import FieldOfView, detect_fov
from edgeretina.preprocess.sources import ImageRef, ImageSource, expand_frames, iter_sources
from edgeretina.preprocess.geometry import Geometry, grid_presence, map_to_original
from edgeretina.preprocess.transform import input_field_mask, normalize, prepare, preprocess

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_PIXELS",
    "PreprocessConfig",
    "FieldOfView",
    "Geometry",
    "decode_image",
    "detect_fov",
    "list_images",
    "is_image_file",
    "ImageRef",
    "ImageSource",
    "iter_sources",
    "expand_frames",
    "prepare",
    "input_field_mask",
    "normalize",
    "preprocess",
    "map_to_original",
    "grid_presence",
]
