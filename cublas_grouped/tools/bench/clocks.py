"""The GPU's SM clock and power draw while the benchmark times a section.

Under sustained load a GPU holds its power limit by lowering its clock: an
H200 running DeepSeek-V3's layer back to back sat at 700 W with its SM clock
near 1400 MHz instead of 1980 within a second (docs/kernel-notes.md,
"Power-limited clocks"). Rows timed in different sections can therefore meet
different clocks, so each timing carries the clock it ran at.

NVML is read through ctypes (``libnvidia-ml.so.1``, installed with the
driver) by a thread that samples every :data:`PERIOD_S` seconds while a
section is timed (NVML calls release the GIL, and the thread sleeps between
them). Where NVML cannot be loaded or does not know the device (no driver,
the stand-in GPU of the CPU tests), nothing is sampled and the results carry
no clock. :func:`format_clocks` prints what was sampled, per case and section.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
from contextlib import contextmanager

__all__ = ["PERIOD_S", "ClockSampler", "summarize", "format_clocks"]

PERIOD_S = 0.02
_NVML_CLOCK_SM = 1  # nvmlClockType_t NVML_CLOCK_SM
_NVML_SUCCESS = 0


class ClockSampler:
    """Samples the SM clock (MHz) and power draw (W) of the GPU at PCI bus id
    ``pci_bus_id``. ``lib`` and ``device``: an NVML library and device handle
    already opened (the tests' stand-ins); by default NVML is opened here."""

    def __init__(self, pci_bus_id: str | None, lib=None, device=None):
        self._lib, self._device = lib, device
        if lib is None and pci_bus_id:
            try:
                nvml = ctypes.CDLL("libnvidia-ml.so.1")
                handle = ctypes.c_void_p()
                if (
                    nvml.nvmlInit_v2() == _NVML_SUCCESS
                    and nvml.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(handle))
                    == _NVML_SUCCESS
                ):
                    self._lib, self._device = nvml, handle
            except (OSError, AttributeError):  # no NVML on this machine
                pass

    @property
    def available(self) -> bool:
        return self._lib is not None and self._device is not None

    def read(self) -> tuple[int, float | None] | None:
        """(SM clock in MHz, power in W or None), or None when NVML cannot say."""
        if not self.available:
            return None
        mhz, milliwatts = ctypes.c_uint(), ctypes.c_uint()
        if self._lib.nvmlDeviceGetClockInfo(self._device, _NVML_CLOCK_SM, ctypes.byref(mhz)) != _NVML_SUCCESS:
            return None
        ok = self._lib.nvmlDeviceGetPowerUsage(self._device, ctypes.byref(milliwatts)) == _NVML_SUCCESS
        return int(mhz.value), (milliwatts.value / 1000.0 if ok else None)

    @contextmanager
    def sampling(self, period_s: float = PERIOD_S):
        """A list that fills with :meth:`read`'s samples while the block runs
        (one taken at once, then one every ``period_s``); empty without NVML."""
        samples: list[tuple[int, float | None]] = []
        if not self.available:
            yield samples
            return
        stop = threading.Event()

        def run():
            while True:
                got = self.read()
                if got is not None:
                    samples.append(got)
                if stop.wait(period_s):
                    return

        thread = threading.Thread(target=run, name="bench-clock", daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()


def summarize(samples) -> dict | None:
    """Median and lowest SM clock and median power of ``samples`` (None if none)."""
    if not samples:
        return None
    clocks = [mhz for mhz, _ in samples]
    powers = [w for _, w in samples if w is not None]
    return {
        "sm_mhz": statistics.median(clocks),
        "sm_mhz_min": min(clocks),
        "power_w": statistics.median(powers) if powers else None,
        "samples": len(samples),
    }


def format_clocks(results) -> str:
    """The SM clock each case's sections were timed at (the ``clock`` in each
    result's ``extra``), where NVML could say: under a power limit, rows of
    different sections ran at different clocks. Empty without any."""
    per_case: dict[str, dict[str, dict]] = {}
    for r in results:
        clock = r.extra.get("clock") if r.error is None else None
        if clock:
            per_case.setdefault(r.case, {}).setdefault(r.section, clock)
    if not per_case:
        return ""
    lines = [
        "SM clock while timed (NVML: median MHz, lowest in brackets, median power), per case and section:"
    ]
    for case, sections in per_case.items():
        parts = [
            f"{section} {c['sm_mhz']:.0f} ({c['sm_mhz_min']:.0f})"
            + (f" {c['power_w']:.0f} W" if c.get("power_w") is not None else "")
            for section, c in sections.items()
        ]
        lines.append(f"  {case}: " + "; ".join(parts))
    return "\n".join(lines)
