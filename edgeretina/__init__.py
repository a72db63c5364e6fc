"""edgeretina: diabetic-retinopathy grading from training to a portable fundus camera."""

__version__ = "0.1.0"
