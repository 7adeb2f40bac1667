"""Random small fleets and batches for the scheduler tests."""

from __future__ import annotations

import numpy as np

from lepton.coordinator.scheduler import DeviceState, TaskSpec

GIB = 1 << 30


def random_fleet(rng: np.random.Generator, m: int, *, filters: bool = True) -> list[DeviceState]:
    """``m`` heterogeneous devices; with ``filters`` some are offline, hot, low on battery..."""
    out = []
    for i in range(m):
        hot = filters and rng.random() < 0.1
        battery = filters and rng.random() < 0.2
        out.append(
            DeviceState(
                device_id=f"d{i}",
                online=not (filters and rng.random() < 0.1),
                device_class=str(rng.choice(["pi4", "pi5", "jetson"])),
                cpu_count=4,
                mem_available=int(rng.uniform(1, 8) * GIB),
                fp32_gflops=float(rng.uniform(5, 200)),
                int8_gops=float(rng.uniform(10, 800)) if rng.random() < 0.7 else None,
                runtimes=frozenset(rng.choice(["onnxruntime", "tflite", "tensorrt"], size=2)),
                accelerators=frozenset({"cuda"}) if rng.random() < 0.3 else frozenset(),
                throttled=hot,
                temperature_c=float(rng.uniform(30, 90)) if filters else None,
                battery_percent=float(rng.uniform(5, 100)) if battery else None,
                plugged=False if battery else None,
                slots_total=int(rng.integers(1, 3)),
                slots_busy=int(rng.integers(0, 2)),
                queued=int(rng.integers(0, 3)),
                bandwidth_bps=float(rng.uniform(5e6, 200e6)),
                rtt_s=float(rng.uniform(0.005, 0.08)),
                data_sources=frozenset({f"s{int(rng.integers(3))}"}),
            )
        )
    return out


def random_tasks(rng: np.random.Generator, n: int, *, filters: bool = True) -> list[TaskSpec]:
    out = []
    for j in range(n):
        pick = rng.random()
        out.append(
            TaskSpec(
                task_id=f"t{j}",
                kind="infer",
                model_class=str(rng.choice(["cnn", "rnn"])),
                precision="int8" if rng.random() < 0.6 else "fp32",
                demand_gops=float(rng.uniform(1, 30)),
                input_bytes=int(rng.uniform(0, 2e6)),
                output_bytes=int(rng.uniform(0, 1e4)),
                memory_bytes=int(rng.uniform(0.1, 6) * GIB) if filters else 0,
                runtime=str(rng.choice(["onnxruntime", "tflite"]))
                if filters and pick < 0.3
                else None,
                accelerator="cuda" if filters and 0.3 <= pick < 0.35 else None,
                data_source=f"s{int(rng.integers(3))}" if filters and 0.35 <= pick < 0.4 else None,
                min_battery=50.0 if filters and 0.4 <= pick < 0.45 else None,
                device_id=f"d{int(rng.integers(8))}" if filters and 0.45 <= pick < 0.5 else None,
            )
        )
    return out
