"""Energy per item: measured through RAPL where the kernel lets us read it, otherwise estimated.

    measured  RAPL package counters (/sys/class/powercap/intel-rapl:N/energy_uj, also on AMD Zen) read
              before and after the work; the counter wraps at max_energy_range_uj. It counts the whole
              package, so other processes' work is included: run on an idle machine.
    estimate  CPU seconds this process spent (all its threads) x watts per busy core, where the
              per-core figure is the CPU's rated package power divided by its cores (a small table of
              families below, else DEFAULT_WATTS_PER_CORE); override with --watts-per-core or
              $SLIMCART_WATTS_PER_CORE.

Every figure carries its method, so an estimate is never shown as a measurement.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import SlimcartError

POWERCAP = Path("/sys/class/powercap")
DEFAULT_WATTS_PER_CORE = 5.0
# (substring of the CPU model, watts per core, where the figure comes from): rated TDP / cores of a
# typical part of the family. Coarse on purpose; the report says it is an estimate.
RATED = [
    ("EPYC", 4.4, "AMD EPYC server parts: ~280 W TDP / 64 cores"),
    ("Xeon", 6.0, "Intel Xeon Scalable: ~250 W TDP / 40 cores"),
    ("Ryzen", 8.0, "AMD Ryzen desktop: ~105 W TDP / 12 cores"),
    ("Core(TM)", 10.0, "Intel Core desktop: ~125 W base power / 12 performance cores"),
    ("Apple", 3.0, "Apple silicon: ~20 W / 6-8 cores"),
]


def rapl_domains(root: Path = POWERCAP) -> list[Path]:
    """Readable package-level RAPL domains (intel-rapl:N, not the sub-domains intel-rapl:N:M)."""
    out = []
    for d in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
        if d.name.count(":") != 1:
            continue
        f = d / "energy_uj"
        try:
            int(f.read_text())
        except (OSError, ValueError):
            continue
        out.append(d)
    return out


def watts_per_core(cpu: str, override: float | None = None) -> tuple[float, str]:
    if override is None and os.environ.get("SLIMCART_WATTS_PER_CORE"):
        try:
            override = float(os.environ["SLIMCART_WATTS_PER_CORE"])
        except ValueError:
            raise SlimcartError(f"SLIMCART_WATTS_PER_CORE={os.environ['SLIMCART_WATTS_PER_CORE']!r} is not a number") from None
    if override is not None:
        if override <= 0:
            raise SlimcartError(f"watts per core must be positive, got {override}")
        return float(override), "given by the user"
    for key, watts, why in RATED:
        if key in cpu:
            return watts, why
    return DEFAULT_WATTS_PER_CORE, "default (CPU family not in slimcart's table)"


@dataclass
class EnergyMeter:
    """`joules(fn)` runs fn and returns (its result, joules spent). Method: 'measured' or 'estimate'."""

    method: str
    detail: str
    watts: float | None = None
    domains: tuple[Path, ...] = ()

    @classmethod
    def create(cls, cpu: str, override: float | None = None, root: Path = POWERCAP) -> "EnergyMeter":
        domains = rapl_domains(root) if override is None else []
        if domains:
            return cls("measured", f"RAPL {', '.join(d.name for d in domains)} (whole package)", None, tuple(domains))
        watts, why = watts_per_core(cpu, override)
        return cls("estimate", f"CPU time x {watts:g} W per busy core ({why})", watts)

    def _read(self) -> float:
        if self.method == "measured":
            return sum(int((d / "energy_uj").read_text()) for d in self.domains) / 1e6
        return time.process_time() * self.watts

    def _wrap(self) -> float:
        """Joules at which the counters wrap (0 for the estimate, which does not)."""
        if self.method != "measured":
            return 0.0
        total = 0.0
        for d in self.domains:
            try:
                total += int((d / "max_energy_range_uj").read_text()) / 1e6
            except (OSError, ValueError):
                pass
        return total

    def joules(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        before = self._read()
        result = fn()
        spent = self._read() - before
        if spent < 0:  # a RAPL counter wrapped during fn
            spent += self._wrap()
        return result, max(spent, 0.0)

    def as_dict(self) -> dict:
        return {"method": self.method, "detail": self.detail, "watts_per_core": self.watts}


def energy_per_item(meter: EnergyMeter, sides: dict[str, Callable[[Any], Any]], batches: list[Any], items: int,
                    rounds: int = 2) -> dict[str, float]:
    """Joules per item of each side over the same batches, sides alternated round by round (so a
    change of machine load hits every side alike); `items` = items in one batch."""
    spent = {k: 0.0 for k in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _, j = meter.joules(lambda f=sides[name]: [f(b) for b in batches])
            spent[name] += j
    return {k: v / (rounds * len(batches) * items) for k, v in spent.items()}
