"""Progress bars on stderr (rate and ETA included), quiet when AVBALANCE_QUIET is set."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def quiet() -> bool:
    """True when AVBALANCE_QUIET asks for no progress output (tests, sweeps' child runs)."""
    return bool(os.environ.get("AVBALANCE_QUIET"))


def progress_bar(total: int | None, desc: str, unit: str = "it", unit_scale: bool = False) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
        disable=quiet(),
    )
