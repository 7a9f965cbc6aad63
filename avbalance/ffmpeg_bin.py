"""Locate an ffmpeg binary: the system one when present, else the one imageio-ffmpeg ships.

The pip-only install (no root, no apt) still works because the ``imageio-ffmpeg`` wheel
carries a static ffmpeg. ``AVBALANCE_FFMPEG`` overrides both.
"""

from __future__ import annotations

import functools
import os
import shutil

from avbalance.errors import UserError


@functools.lru_cache(maxsize=1)
def ffmpeg_binary() -> str:
    """Return the path of the ffmpeg executable to use, or raise a clear UserError."""
    override = os.environ.get("AVBALANCE_FFMPEG")
    if override:
        if not os.access(override, os.X_OK):
            raise UserError(f"AVBALANCE_FFMPEG={override} is not an executable file")
        return override
    system = shutil.which("ffmpeg")
    if system:
        return system
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as err:  # the wheel is missing or its binary is unusable
        raise UserError(
            "no ffmpeg found: install it (apt-get install ffmpeg) or run `make install`, "
            f"which installs the imageio-ffmpeg wheel with its own binary ({err})"
        ) from None
