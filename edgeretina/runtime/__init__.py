"""The on-device runtime: numpy + OpenCV + one inference backend. Never imports torch."""

from edgeretina.runtime.grader import GradedImage, Grader, GradeRecord

__all__ = ["Grader", "GradeRecord", "GradedImage"]
