"""Errors of the model pipeline and registry, under the project's one root (``LeptonError``).

Lookups of unknown models or blobs raise :class:`lepton.coordinator.errors.NotFoundError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lepton.common.errors import LeptonError

if TYPE_CHECKING:
    from lepton.coordinator.model_registry.quantize import QuantizationReport

__all__ = ["AccuracyGateError", "BlobIntegrityError", "QuantizationError"]


class QuantizationError(LeptonError):
    """Exporting, pre-processing, quantizing or evaluating a model failed."""

    def __init__(self, stage: str, detail: str) -> None:
        self.stage = stage
        self.detail = detail
        super().__init__(f"{stage}: {detail}")


class AccuracyGateError(LeptonError):
    """The INT8 model lost more accuracy than the gate allows; nothing was published.

    Accuracies are fractions in [0, 1]; ``drop_points`` and ``gate_points`` are percentage
    points. ``report`` holds every figure the pipeline measured.
    """

    def __init__(self, report: QuantizationReport) -> None:
        self.report = report
        self.accuracy_fp32 = report.accuracy_fp32
        self.accuracy_int8 = report.accuracy_int8
        self.drop_points = report.drop_points
        self.gate_points = report.gate_points
        super().__init__(
            f"INT8 accuracy {report.accuracy_int8 * 100:.2f} % is "
            f"{report.drop_points:.2f} points below FP32 {report.accuracy_fp32 * 100:.2f} %; "
            f"the gate allows {report.gate_points:.2f}"
        )


class BlobIntegrityError(LeptonError):
    """Stored or received bytes do not hash to the digest they are filed under."""

    def __init__(self, expected: str, actual: str, *, where: str = "") -> None:
        self.expected = expected
        self.actual = actual
        self.where = where
        suffix = f" ({where})" if where else ""
        super().__init__(f"blob sha256 mismatch: expected {expected}, got {actual}{suffix}")
