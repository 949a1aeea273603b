"""The merge's timed stages: planning, laser (both while preparing), then writing, verifying, routing_check."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

logger = logging.getLogger("frankenmoe")


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time one stage of a merge into `timings[name]`, logging when it starts and finishes.

    The log records carry `stage`, `status` and (when finished) `seconds`, which `--log-format json`
    writes as fields of one JSON object per line.
    """
    logger.info("%s started", name, extra={"stage": name, "status": "started"})
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started
    logger.info(
        "%s finished in %.1f s",
        name,
        timings[name],
        extra={"stage": name, "status": "finished", "seconds": timings[name]},
    )
