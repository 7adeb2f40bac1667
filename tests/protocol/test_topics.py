from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton.common.errors import LeptonError
from lepton.protocol import topics
from lepton.protocol.errors import TopicError
from lepton.protocol.topics import (
    CMD_CHANNELS,
    DEVICE_CHANNELS,
    MAX_ID_LENGTH,
    Topic,
    cmd_filter,
    cmd_topic,
    device_filter,
    device_topic,
    parse,
    validate_id,
)

valid_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]*", fullmatch=True).filter(
    lambda s: len(s) <= MAX_ID_LENGTH
)

BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("a" * (MAX_ID_LENGTH + 1), id="over-long"),
    pytest.param("dev+1", id="plus"),
    pytest.param("+", id="plus-only"),
    pytest.param("dev#", id="hash"),
    pytest.param("#", id="hash-only"),
    pytest.param("a/b", id="slash"),
    pytest.param("dev\x00", id="nul"),
    pytest.param("dev 1", id="space"),
    pytest.param(" dev", id="leading-space"),
    pytest.param("dev\t", id="tab"),
    pytest.param("dev\n", id="trailing-newline"),
    pytest.param("dev\r\n", id="crlf"),
    pytest.param("\u00a0dev", id="nbsp"),
    pytest.param("$SYS", id="dollar-first"),
    pytest.param("dev$", id="dollar-inside"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dot-dot"),
    pytest.param("-dev", id="leading-dash"),
    pytest.param("d\u00e9v", id="non-ascii"),
    pytest.param("dev\u200b", id="zero-width-space"),
    pytest.param("\uff0b", id="fullwidth-plus"),
]


@settings(max_examples=75, deadline=None)
@given(fleet=valid_ids, device=valid_ids, channel=st.sampled_from(sorted(DEVICE_CHANNELS)))
def test_device_topic_round_trips(fleet: str, device: str, channel: str) -> None:
    topic = device_topic(fleet, device, channel)
    assert parse(topic) == Topic(fleet=fleet, direction="device", device_id=device, channel=channel)


@settings(max_examples=75, deadline=None)
@given(fleet=valid_ids, device=valid_ids, channel=st.sampled_from(sorted(CMD_CHANNELS)))
def test_cmd_topic_round_trips(fleet: str, device: str, channel: str) -> None:
    topic = cmd_topic(fleet, device, channel)
    assert parse(topic) == Topic(fleet=fleet, direction="cmd", device_id=device, channel=channel)


def test_topic_layout_matches_the_documented_scheme() -> None:
    assert device_topic("f1", "pi-7", "state") == "lepton/v1/f1/device/pi-7/state"
    assert cmd_topic("f1", "pi-7", "task") == "lepton/v1/f1/cmd/pi-7/task"
    assert device_filter("f1") == "lepton/v1/f1/device/+/+"
    assert device_filter("f1", "result") == "lepton/v1/f1/device/+/result"
    assert device_filter("f1", "#", "pi-7") == "lepton/v1/f1/device/pi-7/#"
    assert cmd_filter("f1", "pi-7") == "lepton/v1/f1/cmd/pi-7/+"


def test_id_at_the_length_limit_is_accepted() -> None:
    longest = "a" * MAX_ID_LENGTH
    assert validate_id(longest) == longest
    assert parse(device_topic(longest, longest, "state")).device_id == longest


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_device_id_is_refused_everywhere(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_id(bad)
    with pytest.raises(TopicError):
        device_topic("fleet", bad, "state")
    with pytest.raises(TopicError):
        cmd_topic("fleet", bad, "task")
    with pytest.raises(TopicError):
        cmd_filter("fleet", bad)
    if bad != "+":  # "+" is the filter's own wildcard
        with pytest.raises(TopicError):
            device_filter("fleet", "state", bad)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_fleet_is_refused_everywhere(bad: str) -> None:
    with pytest.raises(TopicError):
        device_topic(bad, "dev", "state")
    with pytest.raises(TopicError):
        cmd_topic(bad, "dev", "task")
    with pytest.raises(TopicError):
        device_filter(bad)
    with pytest.raises(TopicError):
        cmd_filter(bad, "dev")


# A "/" changes the level count instead; the shape tests cover that.
BAD_LEVELS = [p for p in BAD_IDS if "/" not in str(p.values[0])]


@pytest.mark.parametrize("bad", BAD_LEVELS)
def test_parse_refuses_bad_ids_in_a_topic(bad: str) -> None:
    with pytest.raises(TopicError):
        parse(f"lepton/v1/fleet/device/{bad}/state")
    with pytest.raises(TopicError):
        parse(f"lepton/v1/{bad}/cmd/dev/task")


@pytest.mark.parametrize("value", [None, 7, b"dev", ["dev"]])
def test_non_string_id_is_a_topic_error(value: object) -> None:
    with pytest.raises(TopicError):
        validate_id(value)  # type: ignore[arg-type]


def test_topic_error_names_what_was_wrong() -> None:
    with pytest.raises(TopicError) as info:
        validate_id("a b", what="fleet")
    assert isinstance(info.value, LeptonError)
    assert "fleet" in info.value.reason
    assert info.value.topic == "a b"


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param("lepton", id="root-only"),
        pytest.param("lepton/v1/f/device/d", id="short"),
        pytest.param("lepton/v1/f/device/d/state/extra", id="long"),
        pytest.param("lepton/v1/f/device/d/state/", id="trailing-slash"),
        pytest.param("/lepton/v1/f/device/d/state", id="leading-slash"),
        pytest.param("other/v1/f/device/d/state", id="foreign-root"),
        pytest.param("Lepton/v1/f/device/d/state", id="root-case"),
        pytest.param("$SYS/broker/load/bytes/received/1min", id="broker-internal"),
        pytest.param("lepton/v2/f/device/d/state", id="other-version"),
        pytest.param("lepton/v1/f/devices/d/state", id="unknown-direction"),
        pytest.param("lepton/v1/f/device/d/task", id="cmd-channel-on-device"),
        pytest.param("lepton/v1/f/cmd/d/state", id="device-channel-on-cmd"),
        pytest.param("lepton/v1/f/device/d/nope", id="unknown-channel"),
        pytest.param("lepton/v1/f/device/d/", id="empty-channel"),
        pytest.param("lepton/v1/f/device//state", id="empty-device"),
        pytest.param("lepton/v1//device/d/state", id="empty-fleet"),
        pytest.param("lepton/v1/f/device/+/state", id="wildcard-device"),
        pytest.param("lepton/v1/f/device/d/+", id="wildcard-channel"),
        pytest.param("lepton/v1/f/device/d/#", id="multilevel-wildcard"),
        pytest.param("lepton/v1/f/device/d/STATE", id="channel-case"),
    ],
)
def test_parse_refuses_topics_outside_the_scheme(topic: str) -> None:
    with pytest.raises(TopicError):
        parse(topic)


@pytest.mark.parametrize("value", [None, b"lepton/v1/f/device/d/state", 3])
def test_parse_refuses_non_strings(value: object) -> None:
    with pytest.raises(TopicError):
        parse(value)  # type: ignore[arg-type]


def test_builders_refuse_unknown_channels() -> None:
    with pytest.raises(TopicError):
        device_topic("f", "d", "task")  # a cmd channel
    with pytest.raises(TopicError):
        cmd_topic("f", "d", "state")  # a device channel
    with pytest.raises(TopicError):
        device_topic("f", "d", "+")  # a wildcard is not a concrete topic
    with pytest.raises(TopicError):
        device_filter("f", "bogus")


def test_channel_names_are_themselves_safe_topic_levels() -> None:
    for channel in DEVICE_CHANNELS | CMD_CHANNELS:
        assert validate_id(channel, what="channel") == channel
    assert not DEVICE_CHANNELS & CMD_CHANNELS


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100))
def test_parse_raises_only_topic_error(topic: str) -> None:
    try:
        parsed = parse(topic)
    except TopicError:
        return
    # Anything accepted is a topic the builders would produce.
    build = topics.device_topic if parsed.direction == "device" else topics.cmd_topic
    assert build(parsed.fleet, parsed.device_id, parsed.channel) == topic


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_validate_id_accepts_only_safe_levels(value: str) -> None:
    try:
        validate_id(value)
    except TopicError:
        return
    assert 1 <= len(value) <= MAX_ID_LENGTH
    assert value.isascii()
    assert not set(value) & set("+#/$\x00 \t\r\n")
