"""Device profiling: how fast this device runs a transformer block, measured in a job process.

The measurement (a reference GPT-2-small block, forward + backward, in a fresh process with the
worker's thread count) is kept in ``state_dir/profile.json`` and refreshed once a day, only while no
job runs here, so profiling never competes with training. The planner scales it to each model's block
shape (`cetd.daemon.planning_inputs.scale_block_seconds`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from cetd.errors import CetdError
from cetd.identity import write_file_atomic
from cetd.transport.peer_info import Capabilities

from .job_process import JobProcess

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
REFRESH = timedelta(days=1)


def load_profile(state_dir: Path, threads: int) -> float:
    """The stored block time, or 0 when there is none for this thread count or it is stale."""
    try:
        data = json.loads((state_dir / PROFILE_FILE).read_text())
    except (OSError, ValueError):
        return 0.0
    if data.get("threads") != threads or time.time() - float(data.get("at", 0)) > REFRESH.total_seconds():
        return 0.0
    return float(data.get("block_seconds", 0.0))


async def profile_device(state_dir: Path, threads: int) -> float:
    """Measure the block time in a fresh process; store and return it."""
    process = JobProcess(name="the profiler", log_path=state_dir / "profile.log")
    await process.start({"role": "profile", "threads": threads})
    try:
        event = await process.expect("profiled", timedelta(minutes=5))
    finally:
        await process.stop()
    block_seconds = float(event["block_seconds"])
    write_file_atomic(state_dir / PROFILE_FILE, json.dumps(
        {"block_seconds": block_seconds, "threads": threads, "at": time.time()}).encode(), 0o600)
    return block_seconds


async def keep_profiled(state_dir: Path, threads: int, capabilities: Callable[[], Capabilities],
                        publish: Callable[[Capabilities], None], busy: Callable[[], bool],
                        first_delay: timedelta = timedelta(seconds=5), lock: asyncio.Lock | None = None) -> None:
    """Background task: profile when there is no fresh measurement and no job runs; publish the result.

    ``lock`` is held while measuring: the shape profiler (`cetd.daemon.shape_profiles`) holds it too, so
    two measurements never share the device's cores.
    """
    lock = lock or asyncio.Lock()
    await asyncio.sleep(first_delay.total_seconds())
    while True:
        if load_profile(state_dir, threads) <= 0 and not busy():
            try:
                async with lock:
                    seconds = await profile_device(state_dir, threads)
            except (CetdError, OSError) as error:
                logger.warning("device profiling failed: %s", error)
            else:
                logger.info("profiled: %.1f ms per sample for a GPT-2-small block (forward + backward, %d threads)",
                            seconds * 1000, threads)
                publish(replace(capabilities(), block_seconds=seconds))
        await asyncio.sleep(600)
