"""Calibrated throughput: what one task lane of a device really achieves, per model class.

A device's start-up micro-benchmark says what its silicon can do; a real model reaches some
fraction of that, which depends on the model class, the precision and the hardware. The
estimator starts from the bench figure and moves toward every observed task
(demand / seconds) with an exponentially weighted moving average. Averages are taken over
log rates, because rates are multiplicative: one task twice as fast and one twice as slow
should leave the estimate where it was.

Two levels are learned:

* per ``(device_id, model_class, precision)``: the rate of that device, once it has run
  such a task;
* per ``(device_class, model_class, precision)``: the ratio observed / bench, which seeds the
  prior of devices of that class that have not run such a task yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from coordinator.scheduler.model import DeviceState

SNAPSHOT_VERSION: Final = 1

_Key = tuple[str, str, str]
_ClassKey = tuple[str, str, str]
_ANY_CLASS: Final = ""


class ThroughputEstimator:
    """EWMA of task throughput per ``(device_id, model_class, precision)``, in GOP/s per lane.

    ``alpha`` is the steady-state weight of a new observation. The prior counts as
    ``prior_weight`` pseudo-observations, so the first few real observations weigh more
    (1/2, 1/3, ... with the default) until the weight falls to ``alpha``; a bench figure that
    is far off is corrected after a handful of tasks, not dozens.

    Without an int8 bench figure an int8 task is assumed to run ``int8_speedup`` times the fp32
    figure; without any bench figure a device is assumed to do ``fallback_gops_per_core``
    per CPU core.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        prior_weight: float = 1.0,
        int8_speedup: float = 1.0,
        fallback_gops_per_core: float = 0.5,
        min_seconds: float = 1e-6,
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
        # key -> (log rate, observations)
        self._rates: dict[_Key, tuple[float, int]] = {}
        # (device_class, model_class, precision) -> (log(observed / bench), observations)
        self._efficiency: dict[_ClassKey, tuple[float, int]] = {}
        # The last state seen of each device, so an observation can relate to its bench.
        self._devices: dict[str, DeviceState] = {}

    # ------------------------------------------------------------------ reading

    def bench_rate(self, device: DeviceState, precision: str) -> float:
        """Per-lane rate in GOP/s from the device's bench figures alone (never zero)."""
        lanes = max(device.slots_total, 1)
        fp32 = device.fp32_gflops
        if fp32 <= 0:
            fp32 = self.fallback_gops_per_core * max(device.cpu_count, 1)
        if precision == "int8":
            whole = device.int8_gops if device.int8_gops else fp32 * self.int8_speedup
        else:
            whole = fp32
        return whole / lanes

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

    def rate(self, device: DeviceState, model_class: str, precision: str) -> float:
        """Expected GOP/s of one lane of ``device`` on a ``model_class`` task at ``precision``."""
        self._devices[device.device_id] = device
        est = self._rates.get((device.device_id, model_class, precision))
        if est is not None:
            return math.exp(est[0])
        return self.prior(device, model_class, precision)

    def rates(
        self, devices: Sequence[DeviceState], model_class: str, precision: str
    ) -> list[float]:
        """:meth:`rate` for many devices at once (the cost matrix's path)."""
        return [self.rate(d, model_class, precision) for d in devices]

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
        through :meth:`rate` yet (after a restart, say); without either, the first observation
        becomes the estimate as is. A task with no demand teaches nothing and is ignored.
        """
        if not (math.isfinite(demand_gops) and math.isfinite(seconds)):
            raise ValueError("demand_gops and seconds must be finite")
        if demand_gops < 0 or seconds < 0:
            raise ValueError("demand_gops and seconds must be >= 0")
        if demand_gops == 0:
            return
        if device is not None:
            self.rate(device, model_class, precision)  # records the bench figures
        log_obs = math.log(demand_gops / max(seconds, self.min_seconds))
        key = (device_id, model_class, precision)
        known = self._devices.get(device_id)
        est = self._rates.get(key)
        if est is None:
            if known is not None:
                est = (math.log(self.prior(known, model_class, precision)), 0)
            else:
                est = (log_obs, 0)
        w = self._weight(est[1])
        self._rates[key] = ((1.0 - w) * est[0] + w * log_obs, est[1] + 1)
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
        self._devices.pop(device_id, None)

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """A JSON/msgpack-safe copy of the learned state, for the service to persist."""
        return {
            "version": SNAPSHOT_VERSION,
            "rates": [
                [dev, mc, prec, math.exp(lr), n] for (dev, mc, prec), (lr, n) in self._rates.items()
            ],
            "efficiency": [
                [cls, mc, prec, math.exp(le), n]
                for (cls, mc, prec), (le, n) in self._efficiency.items()
            ],
            "devices": {
                dev: [
                    d.device_class or _ANY_CLASS,
                    self.bench_rate(d, "fp32"),
                    self.bench_rate(d, "int8"),
                ]
                for dev, d in self._devices.items()
            },
        }

    def load(self, snapshot: dict[str, Any]) -> None:
        """Replace the learned state with one taken by :meth:`snapshot`."""
        if snapshot.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported estimator snapshot version {snapshot.get('version')!r}")
        rates: dict[_Key, tuple[float, int]] = {}
        for dev, mc, prec, rate, n in snapshot.get("rates", []):
            if not rate > 0:
                raise ValueError(f"snapshot rate for {dev!r} must be > 0")
            rates[(str(dev), str(mc), str(prec))] = (math.log(float(rate)), int(n))
        eff: dict[_ClassKey, tuple[float, int]] = {}
        for cls, mc, prec, ratio, n in snapshot.get("efficiency", []):
            if not ratio > 0:
                raise ValueError("snapshot efficiency ratio must be > 0")
            eff[(str(cls), str(mc), str(prec))] = (math.log(float(ratio)), int(n))
        devices: dict[str, DeviceState] = {}
        for dev, (cls, fp32, int8) in snapshot.get("devices", {}).items():
            # One lane with the per-lane figures reproduces the bench rates it had.
            devices[str(dev)] = DeviceState(
                device_id=str(dev),
                device_class=str(cls) or None,
                fp32_gflops=float(fp32),
                int8_gops=float(int8),
                slots_total=1,
            )
        self._rates, self._efficiency, self._devices = rates, eff, devices
