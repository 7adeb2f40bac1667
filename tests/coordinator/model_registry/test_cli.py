from __future__ import annotations

import json
from pathlib import Path

import pytest

from lepton.coordinator.cli.exitcodes import EXIT_ERROR, EXIT_GATE_FAILED
from lepton.coordinator.model_registry.cli import main
from lepton.models.data import DigitsSplits, digits_splits, save_npz

ARTIFACTS = Path(__file__).resolve().parents[3] / "lepton" / "models" / "artifacts"


@pytest.fixture(scope="module")
def splits() -> DigitsSplits:
    return digits_splits()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_ls_show_quantize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], splits: DigitsSplits
) -> None:
    where = ("--data-dir", str(tmp_path / "data"))
    code, out, _ = _run(
        capsys,
        "models",
        "import",
        str(ARTIFACTS / "digits_fp32.onnx"),
        "--name",
        "digits",
        "--precision",
        "fp32",
        "--accuracy-fp32",
        "0.97",
        *where,
    )
    assert code == 0
    assert "digits v1 onnx/fp32 sha256:" in out

    calib = save_npz(tmp_path / "calib.npz", splits.calibration.x, splits.calibration.y)
    code, out, err = _run(
        capsys,
        "models",
        "quantize",
        "digits",
        "--calibration",
        str(calib),
        "--eval",
        str(ARTIFACTS / "digits_test.npz"),
        "--json",
        *where,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["int8"]["parent_version"] == 1
    assert result["int8"]["precision"] == "int8"
    assert result["report"]["passed"] is True

    code, out, _ = _run(capsys, "models", "ls", *where)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split()[:4] == ["NAME", "VER", "FORMAT", "PREC"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["digits", "1", "onnx", "fp32"],
        ["digits", "2", "onnx", "int8"],
    ]

    code, out, _ = _run(capsys, "models", "show", "digits", "--precision", "int8", *where)
    assert code == 0
    assert json.loads(out)["calibration"]["samples"] == 256
    code, out, _ = _run(capsys, "models", "ls", "--json", "digits", *where)
    assert [r["version"] for r in json.loads(out)] == [1, 2]


def test_gate_failure_and_errors_become_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], splits: DigitsSplits
) -> None:
    where = ("--data-dir", str(tmp_path / "data"))
    _run(
        capsys,
        "models",
        "import",
        str(ARTIFACTS / "digits_fp32.onnx"),
        "--name",
        "digits",
        "--precision",
        "fp32",
        *where,
    )
    dark = save_npz(tmp_path / "dark.npz", splits.calibration.x * 0.01, splits.calibration.y)
    code, _, err = _run(
        capsys,
        "models",
        "quantize",
        "digits",
        "--calibration",
        str(dark),
        "--eval",
        str(ARTIFACTS / "digits_test.npz"),
        *where,
    )
    assert code == EXIT_GATE_FAILED
    assert "refused" in err
    assert '"drop_points"' in err
    code, _, err = _run(capsys, "models", "show", "nothing", *where)
    assert code == EXIT_ERROR
    assert "not found" in err
    code, _, err = _run(
        capsys,
        "models",
        "import",
        str(tmp_path / "dark.npz"),
        "--name",
        "x",
        "--precision",
        "fp32",
        *where,
    )
    assert code == EXIT_ERROR
    assert "--format" in err
