from __future__ import annotations

import pytest

from lepton.protocol import routes


def test_values_are_quoted_into_their_segment() -> None:
    assert routes.path(routes.TASK, task_id="t-1") == "/v1/tasks/t-1"
    assert routes.path(routes.TASK, task_id="../devices") == "/v1/tasks/..%2Fdevices"
    assert routes.path(routes.FL_UPLOAD, job_id="j?x", round_no=3, device_id="d") == (
        "/v1/fl/uploads/j%3Fx/3/d"
    )


def test_a_missing_value_is_an_error() -> None:
    with pytest.raises(KeyError):
        routes.path(routes.FL_UPLOAD, job_id="j", round_no=1)
