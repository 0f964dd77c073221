"""The driver's side of a checkpoint: receive every worker's shard, write the files, then the manifest.

After a *checkpoint* step each worker sends its shard (a header with its size and whether it kept a
replica, then the bytes). `CheckpointWriter.save` writes each one as it arrives (atomically, so a large
model never sits in the driver's memory twice), then the manifest that makes the checkpoint complete,
then prunes the job's older checkpoints. A disk failure removes the incomplete folder and becomes a
`CheckpointError` with a one-line reason.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cetd.runtime.checkpoint import (
    CheckpointManifest,
    ShardEntry,
    checkpoint_folder,
    disk_error,
    prepare_folder,
    prune,
    sha256_hex,
    shard_file_name,
    write_file_atomic,
    write_manifest,
)
from cetd.runtime.checkpoint_state import rng_state_text
from cetd.runtime.job_protocol import (
    CHECKPOINT_HEADER_SPEC,
    checkpoint_header_key,
    checkpoint_shard_key,
    worker_ranks,
)
from cetd.runtime.spec import JobPlan, JobSpec
from cetd.transport.channel import TensorKey, TensorSpec

__all__ = ["CheckpointWriter", "Receive"]

logger = logging.getLogger(__name__)

Receive = Callable[[int, TensorKey, TensorSpec], torch.Tensor]
"""Receive one tensor from a worker rank (the driver's `PeerChannel.recv` with its timeout)."""


class CheckpointWriter:
    """Writes one job incarnation's checkpoints into ``directory/job_id``."""

    def __init__(
        self, *, spec: JobSpec, plan: JobPlan, directory: Path, job_id: str, term: int, receive: Receive
    ) -> None:
        self._spec = spec
        self._plan = plan
        self._directory = directory
        self._job_id = job_id
        self._term = term
        self._receive = receive

    def save(self, step: int, losses: list[float]) -> CheckpointManifest:
        """Write the checkpoint after ``step`` (the workers send their shards after that step).

        Raises:
            CheckpointError: a disk failure; the incomplete folder is removed, no manifest written.
        """
        plan = self._plan
        folder = checkpoint_folder(self._directory, self._job_id, step=step, term=self._term)
        prepare_folder(folder, step=step)
        entries: list[ShardEntry] = []
        path = folder
        try:
            for rank in worker_ranks(plan):
                header = self._receive(rank, checkpoint_header_key(step), CHECKPOINT_HEADER_SPEC)
                size, kept = int(header[0]), bool(int(header[1]))
                payload = self._receive(rank, checkpoint_shard_key(step), TensorSpec(dtype=torch.uint8, shape=(size,)))
                data = payload.numpy().tobytes()
                path = folder / shard_file_name(rank)
                write_file_atomic(path, data)
                device = plan.worker(rank).device_id if kept else ""
                entries.append(
                    ShardEntry(file=path.name, rank=rank, device_id=device, size=len(data), sha256=sha256_hex(data))
                )
            manifest = CheckpointManifest(
                job_id=self._job_id,
                step=step,
                term=self._term,
                plan=plan,
                spec=self._spec,
                shards=tuple(entries),
                data_cursor=step,
                rng_state={"driver/torch": rng_state_text()},
                losses=tuple(losses),
                created=time.time(),
            )
            manifest = write_manifest(folder, manifest)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise disk_error(step, error, path) from error
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        removed = prune(self._directory, self._job_id, keep=self._spec.keep_checkpoints)
        logger.info("checkpoint at step %d written to %s (%d older removed)", step, folder, len(removed))
        return manifest
