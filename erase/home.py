"""Where erase caches what it trains and generates: $ERASE_HOME, default ~/.cache/erase."""

from __future__ import annotations

import os

from erase.errors import EraseError


def erase_home() -> str:
    """The cache folder for built-in models and generated data ($ERASE_HOME)."""
    home = os.environ.get("ERASE_HOME", os.path.join(os.path.expanduser("~"), ".cache", "erase"))
    if os.path.exists(home) and not os.path.isdir(home):
        raise EraseError(f"ERASE_HOME '{home}' is a file: point ERASE_HOME at a folder.")
    return home
