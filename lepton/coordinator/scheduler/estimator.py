"""Calibrated throughput: what one task lane of a device really achieves, per model class.

A device's start-up micro-benchmark says what its silicon can do; a real model reaches some
fraction of that, which depends on the model class, the precision and the hardware. The
estimator starts from the bench figure and moves toward every observed task
(demand / seconds). Averages are taken over log rates, because rates are multiplicative: one
task twice as fast and one twice as slow should leave the estimate where it was.

The bench figure is the device's own claim, so it is believed only within bounds
(:mod:`lepton.coordinator.scheduler.claims`: its class's plausible maximum and the median claim of
its peers), and observations outweigh it fast: the claim counts as ``prior_weight``
observations, and that weight falls fourfold with every finished task after the first. A device
that claims far more than it delivers is scheduled at the speed it delivers after two or
three tasks.

Two levels are learned:

* per ``(device_id, model_class, precision)``: the rate of that device, once it has run
  such a task;
* per ``(device_class, model_class, precision)``: the ratio observed / bench, which seeds the
  prior of devices of that class that have not run such a task yet.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, Final

from lepton.coordinator.scheduler.claims import ClaimLimits
from lepton.coordinator.scheduler.types import DeviceState, Precision

SNAPSHOT_VERSION: Final = 2

_Key = tuple[str, str, str]
_ClassKey = tuple[str, str, str]
_ANY_CLASS: Final = ""


class ThroughputEstimator:
    """Throughput per ``(device_id, model_class, precision)``, in GOP/s per lane.

    The estimate blends the (bounded) bench prior, as it stood when the first task was
    observed, with the mean of the observed rates. The observed mean weighs the n-th
    observation ``1/n`` until that falls to ``alpha``, then ``alpha`` (an exponentially
    weighted moving average that follows drift). The prior counts as
    ``prior_weight * 4**-(n-1)`` observations once n tasks were observed: with the default it
    weighs 1/2 after one task, 1/9 after two, 1/49 after three. Claims a device makes after
    its first observed task do not move its estimate.

    Without an int8 bench figure an int8 task is assumed to run ``int8_speedup`` times the fp32
    figure; without any bench figure a device is assumed to do ``fallback_gops_per_core``
    per CPU core. ``limits`` bounds every claim by device class; ``peer_median`` also bounds
    it by the lower median of the claims of the known devices of the same class (devices
    without a class have no peers; the coordinator gives every device a class).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        prior_weight: float = 1.0,
        int8_speedup: float = 1.0,
        fallback_gops_per_core: float = 0.5,
        min_seconds: float = 1e-6,
        limits: ClaimLimits | None = None,
        peer_median: bool = True,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if prior_weight < 0 or int8_speedup <= 0 or fallback_gops_per_core <= 0:
            raise ValueError("prior_weight must be >= 0; speed-up and fallback must be > 0")
        self.alpha = alpha
        self.prior_weight = prior_weight
        self.int8_speedup = int8_speedup
        self.fallback_gops_per_core = fallback_gops_per_core
        self.min_seconds = min_seconds
        self.limits = limits if limits is not None else ClaimLimits()
        self.peer_median = peer_median
        # key -> (mean log observed rate, observations, log prior when first observed)
        self._rates: dict[_Key, tuple[float, int, float | None]] = {}
        # (device_class, model_class, precision) -> (log(observed / bench), observations)
        self._efficiency: dict[_ClassKey, tuple[float, int]] = {}
        # The last state seen of each device, so an observation can relate to its bench and
        # a claim to its peers' claims.
        self._devices: dict[str, DeviceState] = {}
        self._members: dict[str, set[str]] = {}  # device class -> device ids
        self._peer_cache: dict[tuple[str, str], float] = {}

    # ------------------------------------------------------------------ reading

    def claim(self, device: DeviceState, precision: str) -> float:
        """The device's own whole-device figure in GOP/s, bounded by its class's limit."""
        fp32 = device.fp32_gflops
        if fp32 <= 0:
            fp32 = self.fallback_gops_per_core * max(device.cpu_count, 1)
        if precision == "int8":
            whole = device.int8_gops if device.int8_gops else fp32 * self.int8_speedup
        else:
            whole = fp32
        prec: Precision = "int8" if precision == "int8" else "fp32"
        return min(whole, self.limits.limit(device.device_class, prec))

    def bench_rate(self, device: DeviceState, precision: str) -> float:
        """Per-lane rate in GOP/s from the device's bench figures alone (never zero): its
        bounded claim, no more than its peers' median claim, split over its lanes."""
        whole = self.claim(device, precision)
        if self.peer_median and device.device_class:
            whole = min(whole, self._peer_claim(device, precision))
        return whole / max(device.slots_total, 1)

    def _peer_claim(self, device: DeviceState, precision: str) -> float:
        cls = device.device_class or _ANY_CLASS
        key = (cls, precision)
        got = self._peer_cache.get(key)
        if got is None:
            members = self._members.get(cls) or {device.device_id}
            claims = [
                self.claim(self._devices.get(dev, device), precision) for dev in sorted(members)
            ]
            got = self._peer_cache[key] = statistics.median_low(claims)
        return got

    def _record(self, device: DeviceState) -> None:
        """Remember the device's claims; a change invalidates its class's peer median."""
        old = self._devices.get(device.device_id)
        self._devices[device.device_id] = device
        if old is device:
            return
        fields = (device.device_class, device.fp32_gflops, device.int8_gops, device.cpu_count)
        if old is not None and fields == (
            old.device_class,
            old.fp32_gflops,
            old.int8_gops,
            old.cpu_count,
        ):
            return
        if old is not None:
            self._forget_member(old)
        cls = device.device_class or _ANY_CLASS
        self._members.setdefault(cls, set()).add(device.device_id)
        self._invalidate(cls)

    def _forget_member(self, device: DeviceState) -> None:
        cls = device.device_class or _ANY_CLASS
        self._members.get(cls, set()).discard(device.device_id)
        self._invalidate(cls)

    def _invalidate(self, cls: str) -> None:
        for key in [k for k in self._peer_cache if k[0] == cls]:
            del self._peer_cache[key]

    def prior(self, device: DeviceState, model_class: str, precision: str) -> float:
        """Bench rate scaled by the efficiency learned on devices of the same class."""
        bench = self.bench_rate(device, precision)
        return bench * math.exp(self._log_efficiency(device.device_class, model_class, precision))

    def _log_efficiency(self, device_class: str | None, model_class: str, precision: str) -> float:
        cls = device_class or _ANY_CLASS
        eff = self._efficiency.get((cls, model_class, precision))
        if eff is None and cls != _ANY_CLASS:
            eff = self._efficiency.get((_ANY_CLASS, model_class, precision))
        return eff[0] if eff is not None else 0.0

    def prior_share(self, observations: int) -> float:
        """The weight of the prior in the estimate after ``observations`` finished tasks."""
        if observations <= 0:
            return 1.0
        w = self.prior_weight * 0.25 ** (observations - 1)
        return w / (w + observations)

    def rate(self, device: DeviceState, model_class: str, precision: str) -> float:
        """Expected GOP/s of one lane of ``device`` on a ``model_class`` task at ``precision``."""
        self._record(device)
        return self._rate(device, model_class, precision)

    def _rate(self, device: DeviceState, model_class: str, precision: str) -> float:
        est = self._rates.get((device.device_id, model_class, precision))
        if est is None:
            return self.prior(device, model_class, precision)
        mean, n, prior = est
        if prior is None:
            return math.exp(mean)
        share = self.prior_share(n)
        return math.exp(share * prior + (1.0 - share) * mean)

    def rates(
        self, devices: Sequence[DeviceState], model_class: str, precision: str
    ) -> list[float]:
        """:meth:`rate` for many devices at once (the cost matrix's path); every device is
        recorded before any rate is read, so all of them see the same peer medians."""
        for d in devices:
            self._record(d)
        return [self._rate(d, model_class, precision) for d in devices]

    def observations(self, device_id: str, model_class: str, precision: str) -> int:
        """How many finished tasks refined this estimate (0: still the prior)."""
        est = self._rates.get((device_id, model_class, precision))
        return est[1] if est is not None else 0

    # ------------------------------------------------------------------ learning

    def _weight(self, count: int) -> float:
        return max(self.alpha, 1.0 / (count + 1.0 + self.prior_weight))

    def observe(
        self,
        device_id: str,
        model_class: str,
        precision: str,
        demand_gops: float,
        seconds: float,
        *,
        device: DeviceState | None = None,
    ) -> None:
        """Fold one finished task (``demand_gops`` done in ``seconds`` on one lane) in.

        ``device`` supplies the bench figures when this estimator has not seen the device
        through :meth:`rate` yet (after a restart, say); without either, the observations
        alone make the estimate. A task with no demand teaches nothing and is ignored.
        """
        if not (math.isfinite(demand_gops) and math.isfinite(seconds)):
            raise ValueError("demand_gops and seconds must be finite")
        if demand_gops < 0 or seconds < 0:
            raise ValueError("demand_gops and seconds must be >= 0")
        if demand_gops == 0:
            return
        if device is not None:
            self._record(device)
        log_obs = math.log(demand_gops / max(seconds, self.min_seconds))
        key = (device_id, model_class, precision)
        known = self._devices.get(device_id)
        est = self._rates.get(key)
        if est is None:
            prior = None
            if known is not None:
                prior = math.log(self.prior(known, model_class, precision))
            self._rates[key] = (log_obs, 1, prior)
        else:
            mean, n, prior = est
            w = max(self.alpha, 1.0 / (n + 1.0))
            self._rates[key] = ((1.0 - w) * mean + w * log_obs, n + 1, prior)
        if known is not None:
            ratio = log_obs - math.log(self.bench_rate(known, precision))
            for cls in {known.device_class or _ANY_CLASS, _ANY_CLASS}:
                ckey = (cls, model_class, precision)
                old = self._efficiency.get(ckey)
                if old is None:
                    self._efficiency[ckey] = (ratio, 1)
                else:
                    cw = self._weight(old[1])
                    self._efficiency[ckey] = ((1.0 - cw) * old[0] + cw * ratio, old[1] + 1)

    def forget(self, device_id: str) -> None:
        """Drop what was learned about one device (after a hardware change, say)."""
        for key in [k for k in self._rates if k[0] == device_id]:
            del self._rates[key]
        old = self._devices.pop(device_id, None)
        if old is not None:
            self._forget_member(old)

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """A JSON/msgpack-safe copy of the learned state, for the service to persist."""
        return {
            "version": SNAPSHOT_VERSION,
            "rates": [
                [dev, mc, prec, math.exp(lr), n, None if lp is None else math.exp(lp)]
                for (dev, mc, prec), (lr, n, lp) in self._rates.items()
            ],
            "efficiency": [
                [cls, mc, prec, math.exp(le), n]
                for (cls, mc, prec), (le, n) in self._efficiency.items()
            ],
            "devices": {
                dev: [
                    d.device_class or _ANY_CLASS,
                    d.fp32_gflops,
                    d.int8_gops,
                    d.slots_total,
                    d.cpu_count,
                ]
                for dev, d in self._devices.items()
            },
        }

    def load(self, snapshot: dict[str, Any]) -> None:
        """Replace the learned state with one taken by :meth:`snapshot` (this version or 1,
        whose rates are read as observed means and whose bench figures were per lane)."""
        version = snapshot.get("version")
        if version not in (1, SNAPSHOT_VERSION):
            raise ValueError(f"unsupported estimator snapshot version {version!r}")
        rates: dict[_Key, tuple[float, int, float | None]] = {}
        for dev, mc, prec, rate, n, *rest in snapshot.get("rates", []):
            prior = rest[0] if rest else None
            if not rate > 0 or (prior is not None and not prior > 0):
                raise ValueError(f"snapshot rate for {dev!r} must be > 0")
            rates[(str(dev), str(mc), str(prec))] = (
                math.log(float(rate)),
                max(int(n), 1),
                None if prior is None else math.log(float(prior)),
            )
        eff: dict[_ClassKey, tuple[float, int]] = {}
        for cls, mc, prec, ratio, n in snapshot.get("efficiency", []):
            if not ratio > 0:
                raise ValueError("snapshot efficiency ratio must be > 0")
            eff[(str(cls), str(mc), str(prec))] = (math.log(float(ratio)), int(n))
        devices: dict[str, DeviceState] = {}
        for dev, row in snapshot.get("devices", {}).items():
            if version == 1:
                # Per-lane figures on one lane reproduce the bench rates it had.
                cls, fp32, int8 = row
                slots, cpus = 1, 1
            else:
                cls, fp32, int8, slots, cpus = row
            devices[str(dev)] = DeviceState(
                device_id=str(dev),
                device_class=str(cls) or None,
                fp32_gflops=float(fp32),
                int8_gops=None if int8 is None else float(int8),
                slots_total=int(slots),
                cpu_count=int(cpus),
            )
        self._rates, self._efficiency = rates, eff
        self._devices, self._members, self._peer_cache = {}, {}, {}
        for d in devices.values():
            self._record(d)
