"""A progress bar on stderr for long work: tqdm when installed, else a tiny fallback; silent when off."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool | None = None) -> Iterator[T]:
    """Yield `items`, drawing a bar on stderr. `enabled=None` draws only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        yield from _fallback(items, total, desc)
        return
    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _fallback(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    last = 0.0
    done = 0
    for done, item in enumerate(items, 1):
        now = time.monotonic()
        if now - last > 0.2 or done == total:
            last = now
            of = f"/{total}" if total else ""
            sys.stderr.write(f"\r{desc}: {done}{of}")
            sys.stderr.flush()
        yield item
    sys.stderr.write(f"\r{desc}: {done} done\n")
    sys.stderr.flush()
