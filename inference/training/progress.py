"""Owns the progress bars of long commands (`smartnodule train`, `smartnodule eval`, the fine-tune child).

Bars (tqdm, with rate and ETA) go to stderr, and only when stderr is a terminal unless asked
(`--progress always`), so logs and pipes stay clean; `--progress never` turns them off. Lines the
commands print go through `write`, which keeps them above a running bar.
tqdm is imported when a bar is made, so building the CLI's parser does not load it.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

MODES = ("auto", "always", "never")


def add_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", default="auto", choices=MODES,
                   help="progress bars with ETA on stderr: auto (only when stderr is a terminal), always, never")


def enabled(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"progress must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "always" or (mode == "auto" and sys.stderr.isatty())


def bar(mode: str, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
        unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar on stderr (a silent pass-through when `mode` says no bar)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(mode),
                dynamic_ncols=True, mininterval=0.5, **kwargs)


def write(line: str) -> None:
    """Print `line` to stdout without breaking a bar drawn on stderr."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
