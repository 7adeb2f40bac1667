"""Client selection: fast rounds, over-selection, and fairness rules against the baseline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lepton.coordinator.fl.kernels.selection import (
    Candidate,
    Fairness,
    Selection,
    expected_round_time,
    select_clients,
    uniform_random,
)


def fleet(n: int = 20) -> list[Candidate]:
    """Device ``i`` takes ``i + 1`` seconds per round."""
    return [Candidate(device_id=f"dev{i:02d}", expected_s=float(i + 1)) for i in range(n)]


def test_without_fairness_the_fastest_are_chosen() -> None:
    sel = select_clients(fleet(), 5, rng=np.random.default_rng(0))
    assert sel.devices == ["dev00", "dev01", "dev02", "dev03", "dev04"]
    assert sel.expected_round_s == 5.0
    assert sel.shortfall == 0
    assert sel.forced == []


def test_over_selection_adds_spares_and_the_round_ends_at_the_kth() -> None:
    sel = select_clients(fleet(), 4, over_select=0.5, rng=np.random.default_rng(0))
    assert len(sel.devices) == 6
    assert sel.target == 4
    assert sel.expected_round_s == 4.0  # the 4th of the 6 fastest


def test_too_few_candidates_is_a_shortfall_not_an_error() -> None:
    sel = select_clients(fleet(3), 5, over_select=0.2, rng=np.random.default_rng(0))
    assert sorted(sel.devices) == ["dev00", "dev01", "dev02"]
    assert sel.shortfall == 2
    assert sel.expected_round_s == 3.0
    assert select_clients([], 2, rng=np.random.default_rng(0)).devices == []


def test_ties_are_broken_at_random() -> None:
    same = [Candidate(device_id=f"d{i}", expected_s=1.0) for i in range(10)]
    picks = {
        tuple(select_clients(same, 3, rng=np.random.default_rng(s)).devices) for s in range(10)
    }
    assert len(picks) > 1


def test_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="k must"):
        select_clients(fleet(), 0, rng=rng)
    with pytest.raises(ValueError, match="unique"):
        select_clients([*fleet(2), fleet(1)[0]], 1, rng=rng)
    with pytest.raises(ValueError, match="expected_s"):
        select_clients([Candidate(device_id="x", expected_s=float("nan"))], 1, rng=rng)
    with pytest.raises(ValueError, match="over_select"):
        select_clients(fleet(), 1, over_select=-0.1, rng=rng)
    with pytest.raises(ValueError, match="max_staleness"):
        Fairness(max_staleness=0)


def test_expected_round_time() -> None:
    assert expected_round_time([5.0, 1.0, 3.0], 2) == 3.0
    assert expected_round_time([5.0, 1.0], 4) == 5.0
    assert expected_round_time([], 1) == 0.0


def simulate(
    rounds: int, pick: str, *, k: int = 5, fairness: Fairness | None = None, seed: int = 0
) -> tuple[dict[str, int], list[float], int]:
    """Run ``rounds`` selections over a 20-device fleet, keeping participation records.

    Returns participations per device, each round's expected time, and the longest any
    device waited between two selections (or since the start).
    """
    rng = np.random.default_rng(seed)
    devices = {c.device_id: c for c in fleet()}
    times: list[float] = []
    last = dict.fromkeys(devices, -1)
    longest_wait = 0
    for r in range(rounds):
        cands = list(devices.values())
        sel: Selection
        if pick == "uniform":
            sel = uniform_random(cands, k, rng)
        else:
            sel = select_clients(cands, k, fairness=fairness, rng=rng)
        times.append(sel.expected_round_s)
        chosen = set(sel.devices)
        for dev_id, c in devices.items():
            if dev_id in chosen:
                longest_wait = max(longest_wait, r - last[dev_id] - 1)
                last[dev_id] = r
                devices[dev_id] = replace(c, participations=c.participations + 1, rounds_since=0)
            else:
                since = None if c.rounds_since is None else c.rounds_since + 1
                devices[dev_id] = replace(c, rounds_since=since)
    for dev_id in devices:
        longest_wait = max(longest_wait, rounds - last[dev_id] - 1)
    return {d: c.participations for d, c in devices.items()}, times, longest_wait


def test_pure_speed_starves_slow_devices() -> None:
    counts, _, _ = simulate(60, "fast")
    assert sum(1 for n in counts.values() if n == 0) == 15


def test_staleness_floor_hears_from_every_device_in_bounded_time() -> None:
    fairness = Fairness(max_staleness=10, max_forced_share=0.4)
    counts, times, longest_wait = simulate(60, "fast", fairness=fairness)
    assert min(counts.values()) >= 3
    assert longest_wait <= 12
    _, uniform_times, _ = simulate(60, "uniform")
    assert np.mean(times) < np.mean(uniform_times)


def test_participation_penalty_spreads_work_at_a_bounded_cost() -> None:
    fast_counts, fast_times, _ = simulate(60, "fast")
    fair_counts, fair_times, _ = simulate(60, "fast", fairness=Fairness(penalty=1.0))
    _, uni_times, _ = simulate(60, "uniform")
    participating = sum(1 for n in fair_counts.values() if n > 0)
    assert participating > sum(1 for n in fast_counts.values() if n > 0)
    assert np.std(list(fair_counts.values())) < np.std(list(fast_counts.values()))
    assert np.mean(fast_times) <= np.mean(fair_times) < np.mean(uni_times)


def test_uniform_random_baseline() -> None:
    sel = uniform_random(fleet(), 5, np.random.default_rng(3))
    assert len(set(sel.devices)) == 5
    assert sel.expected_round_s == max(int(d[3:]) + 1 for d in sel.devices)
    again = uniform_random(fleet(), 5, np.random.default_rng(3))
    assert again.devices == sel.devices
    assert uniform_random(fleet(2), 5, np.random.default_rng(0)).shortfall == 3
