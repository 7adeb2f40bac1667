"""``lepton rollout create`` arguments -> the plan body the server checks; phase and rate
text; usage errors exit 2 before any call."""

from __future__ import annotations

import pytest

from lepton.coordinator.cli.exitcodes import EXIT_USAGE
from lepton.coordinator.cli.main import build_parser, main
from lepton.coordinator.rollouts.cli import plan_body
from lepton.coordinator.rollouts.plan import PlanError, parse_phases, parse_rate, plan_of


def body(*argv: str) -> dict[str, object]:
    args = build_parser(["rollout"]).parse_args(["rollout", "create", *argv])
    return plan_body(args)


def test_every_option_lands_in_a_plan_the_server_accepts() -> None:
    b = body(
        "--release",
        "lepton-agent@1.4.0",
        "--class",
        "rpi5",
        "--tag",
        "lab",
        "--group",
        "eu",
        "--device",
        "a",
        "--device",
        "b",
        "--phases",
        "canary:5,10%,50%,100%",
        "--rate",
        "60/min",
        "--max-in-flight",
        "7",
        "--success",
        "0.9",
        "--abort-failure",
        "0.3",
        "--abort-min",
        "4",
        "--device-timeout",
        "600",
        "--offline",
        "skip",
        "--approve-after",
        "2",
        "--revert-on-abort",
        "--health-deadline",
        "120",
    )
    plan = plan_of(b)
    assert (plan.kind, plan.name, plan.version) == ("agent", "lepton-agent", "1.4.0")
    assert plan.selector.device_ids == ["a", "b"]
    assert (plan.selector.device_class, plan.selector.tag, plan.selector.group) == (
        "rpi5",
        "lab",
        "eu",
    )
    assert [(p.count, p.percent, p.approval) for p in plan.phases] == [
        (5, None, False),
        (None, 10.0, False),
        (None, 50.0, True),
        (None, 100.0, False),
    ]
    assert (plan.rate_count, plan.rate_window_s, plan.max_in_flight) == (60, 60.0, 7)
    assert (plan.success_threshold, plan.abort_failure_share, plan.abort_min_finished) == (
        0.9,
        0.3,
        4,
    )
    assert (plan.device_timeout_s, plan.offline, plan.revert_on_abort) == (600.0, "skip", True)
    assert plan.health_deadline_s == 120.0
    m = plan_of(
        body("--model", "digits@3", "--probe-source", "test", "--max-accuracy-drop", "0.01")
    )
    assert m.probe is not None
    assert (m.probe.source, m.probe.max_accuracy_drop, m.probe.max_latency_increase) == (
        "test",
        0.01,
        0.2,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [("5,,100%", "phase ''"), ("ten%", "phase 'ten%'"), ("1.5,100%", "whole number")],
)
def test_bad_phase_text(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_phases(text)


def test_phase_and_rate_text() -> None:
    assert parse_phases("canary:2+approve,100%")[0].approval
    with pytest.raises(PlanError, match="approve-after 3"):
        parse_phases("1,100%", (3,))
    assert parse_rate("5/s") == (5, 1.0)
    assert parse_rate("100/h") == (100, 3600.0)
    for bad in ("fast", "5/day", "-1/min", "1.5/min"):
        with pytest.raises(PlanError, match="rate"):
            parse_rate(bad)


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "digits"],
        ["--model", "digits@2", "--phases", "x"],
        ["--model", "digits@2", "--max-accuracy-drop", "0.1"],
        ["--model", "digits@2", "--rate", "lots"],
    ],
)
def test_usage_errors_exit_2_without_calling(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # No coordinator listens there: a call would exit 4, not 2.
    code = main(["--api", "http://127.0.0.1:9", "rollout", "create", *argv])
    assert code == EXIT_USAGE
    assert "error:" in capsys.readouterr().err
