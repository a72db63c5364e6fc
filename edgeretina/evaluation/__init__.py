"""The evaluation report: every grading metric with bootstrap intervals, per mode and per source, as JSON,
Markdown and plots. numpy only at import; matplotlib (the `plot` extra) only when a plot is drawn."""

from edgeretina.evaluation.report import (EvaluationInput, ModePredictions, evaluation_report, markdown_report,
                                          write_report)

__all__ = ["EvaluationInput", "ModePredictions", "evaluation_report", "markdown_report", "write_report"]
