"""GPU telemetry through NVML (nvidia-ml-py), recorded beside each benchmark."""

from __future__ import annotations

import warnings
from typing import Any, Optional

# A drop of the SM clock larger than this between two snapshots is reported as throttling.
CLOCK_DROP_WARNING = 0.10


def snapshot(index: int = 0) -> dict[str, Any]:
    """Name, driver, clocks, power, temperature and memory of GPU ``index``, or why NVML is absent."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "absent: nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return {"nvml": f"absent: {error}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "nvml": "present",
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "memory_used_bytes": memory.used,
        }
    except pynvml.NVMLError as error:
        return {"nvml": f"absent: {error}"}
    finally:
        pynvml.nvmlShutdown()


def clock_drop(before: dict[str, Any], after: dict[str, Any]) -> Optional[str]:
    """A sentence when the SM clock fell by more than CLOCK_DROP_WARNING between the snapshots."""
    if "sm_clock_mhz" not in before or "sm_clock_mhz" not in after:
        return None
    start, end = before["sm_clock_mhz"], after["sm_clock_mhz"]
    if start > 0 and (start - end) / start > CLOCK_DROP_WARNING:
        return (
            f"SM clock fell from {start} to {end} MHz during the benchmark "
            f"(temperature {after.get('temperature_c')} C, power {after.get('power_w')} W): "
            "thermal or power throttling; its timings are pessimistic"
        )
    return None


def record(extra_info: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    extra_info["telemetry_before"] = before
    extra_info["telemetry_after"] = after
    message = clock_drop(before, after)
    if message:
        extra_info["throttling"] = message
        warnings.warn(message, stacklevel=2)
