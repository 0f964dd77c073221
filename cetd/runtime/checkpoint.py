"""Checkpoint files on disk: folders, atomic writes, the manifest, retention and verification.

A checkpoint of a job at step k (after k optimizer steps) is one folder,
``<checkpoint_dir>/<job_id>/step-<k>-term-<t>/``, holding one safetensors *shard* per worker of the plan
that wrote it (``shard-rank<r>.safetensors``, written by `cetd.runtime.checkpoint_state`) and, written
last, ``manifest.json``: job, step, term, plan, spec, every shard's size, SHA-256 and the device keeping
its replica, the data cursor, RNG states and the losses so far. Every file is written atomically (temp
file in the same folder, fsync, rename, fsync of the folder), so a folder without a manifest is an
incomplete checkpoint and is ignored; a disk failure becomes a `CheckpointError` with a one-line reason
and never leaves a manifest behind. Checkpoints order by (term, step): a newer coordinator's work always
wins over a partitioned older one's.

Torch-free on purpose, so the daemon can find, verify and prune checkpoints without importing torch;
`load_full_state` imports the tensor side lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cetd.errors import JobError
from cetd.identity.keys import fsync_directory, write_file_atomic
from cetd.runtime.spec import JobPlan, JobSpec, from_json

if TYPE_CHECKING:
    from cetd.runtime.checkpoint_state import FullState

__all__ = [
    "MANIFEST_NAME",
    "CheckpointError",
    "CheckpointManifest",
    "ShardEntry",
    "checkpoint_folder",
    "complete_checkpoints",
    "disk_error",
    "job_folder",
    "latest_complete",
    "load_full_state",
    "newest_first",
    "prepare_folder",
    "prune",
    "prune_replicas",
    "read_manifest",
    "sha256_hex",
    "shard_file_name",
    "shard_problem",
    "verify",
    "write_file_atomic",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_FOLDER = re.compile(r"^step-(\d+)-term-(\d+)$")
_SHARD = re.compile(r"^shard-rank\d+\.safetensors$")


class CheckpointError(JobError):
    """A checkpoint could not be written or read (full disk, I/O error, missing or corrupt shard)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardEntry:
    """One shard file of a checkpoint, as the manifest lists it."""

    file: str
    """File name inside the checkpoint folder."""
    rank: int
    """Worker rank (in the manifest's plan) whose share the shard holds."""
    device_id: str
    """Device keeping a replica of this shard in its own checkpoint folder ("" when its write failed)."""
    size: int
    """Bytes."""
    sha256: str
    """Hex digest of the file's bytes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointManifest:
    """What a complete checkpoint holds; its presence on disk makes the checkpoint complete."""

    job_id: str
    step: int
    """Optimizer steps done; training goes on at ``step + 1``."""
    term: int
    """Term of the coordinator whose plan wrote it; checkpoints order by (term, step)."""
    plan: JobPlan
    spec: JobSpec
    shards: tuple[ShardEntry, ...]
    data_cursor: int
    """Steps of data consumed (= ``step``: batches are a pure function of step and seed)."""
    rng_state: dict[str, str] = field(default_factory=dict)
    """Base64 RNG states by owner (``driver/torch``, ``rank1/torch``…). Nothing in training draws random
    numbers (dropout is off, batches are seeded per step), so a resume needs none of them; they are kept
    for the record."""
    losses: tuple[float, ...] = ()
    """Loss of steps 1..step."""
    created: float = 0.0
    """Unix time of writing."""
    path: Path | None = field(default=None, compare=False)
    """Where this manifest was read from or written to (not stored in the file)."""

    @property
    def folder(self) -> Path:
        """The checkpoint's folder (only for a manifest read from or written to disk)."""
        if self.path is None:
            raise ValueError("this manifest has not been written to or read from disk")
        return self.path.parent

    def to_json(self) -> str:
        """The manifest file's text (deterministic for a given manifest)."""
        data: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "job_id": self.job_id,
            "step": self.step,
            "term": self.term,
            "data_cursor": self.data_cursor,
            "created": self.created,
            "plan": dataclasses.asdict(self.plan),
            "spec": dataclasses.asdict(self.spec),
            "shards": [dataclasses.asdict(shard) for shard in self.shards],
            "rng_state": dict(self.rng_state),
            "losses": list(self.losses),
        }
        return json.dumps(data, sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, path: Path | None = None) -> CheckpointManifest:
        """Parse a manifest file.

        Raises:
            CheckpointError: the text is not a manifest of a known format.
        """
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown format {raw.get('format')!r}")
            return cls(
                job_id=str(raw["job_id"]),
                step=int(raw["step"]),
                term=int(raw["term"]),
                plan=from_json(JobPlan, json.dumps(raw["plan"])),
                spec=from_json(JobSpec, json.dumps(raw["spec"])),
                shards=tuple(ShardEntry(**entry) for entry in raw["shards"]),
                data_cursor=int(raw["data_cursor"]),
                rng_state={str(k): str(v) for k, v in raw.get("rng_state", {}).items()},
                losses=tuple(float(loss) for loss in raw.get("losses", [])),
                created=float(raw.get("created", 0.0)),
                path=path,
            )
        except (ValueError, TypeError, KeyError, AttributeError, JobError) as error:
            where = f" {path}" if path is not None else ""
            raise CheckpointError(f"malformed checkpoint manifest{where}: {error}") from None


def job_folder(directory: Path, job_id: str) -> Path:
    """Where a job's checkpoints live below a device's checkpoint directory ("" = the directory itself)."""
    if job_id in (".", "..") or "/" in job_id or "\\" in job_id:
        raise ValueError(f"job id {job_id!r} cannot name a folder")
    return directory / job_id if job_id else directory


def checkpoint_folder(directory: Path, job_id: str, *, step: int, term: int) -> Path:
    """The folder of a job's checkpoint at ``step`` written under ``term``."""
    return job_folder(directory, job_id) / f"step-{step:08d}-term-{term}"


def shard_file_name(rank: int) -> str:
    """File name of worker ``rank``'s shard inside a checkpoint folder."""
    return f"shard-rank{rank}.safetensors"


def disk_error(step: int, error: OSError, path: Path | str | None = None) -> CheckpointError:
    """A one-line `CheckpointError` for a failed write (``no space left on device (/path)``)."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    reason = reason[:1].lower() + reason[1:]
    where = path if path is not None else error.filename
    suffix = f" ({where})" if where else ""
    return CheckpointError(f"checkpoint at step {step} could not be written: {reason}{suffix}")


def prepare_folder(folder: Path, *, step: int) -> None:
    """Create a checkpoint folder for writing; a manifest already there is removed first (fsynced), so
    the folder is never complete while its shards are being replaced.

    Raises:
        CheckpointError: the folder cannot be created.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / MANIFEST_NAME
        if manifest.exists():
            manifest.unlink()
            fsync_directory(folder)
    except OSError as error:
        raise disk_error(step, error, folder) from error


def write_manifest(folder: Path, manifest: CheckpointManifest) -> CheckpointManifest:
    """Write the manifest, completing the checkpoint (call after every shard is durably written).

    Returns:
        The manifest with its ``path`` set.

    Raises:
        CheckpointError: the write failed; no manifest is left behind.
    """
    path = folder / MANIFEST_NAME
    try:
        write_file_atomic(path, manifest.to_json().encode("utf-8"))
    except OSError as error:
        raise disk_error(manifest.step, error, path) from error
    return dataclasses.replace(manifest, path=path)


def read_manifest(path: Path) -> CheckpointManifest:
    """Read one manifest file.

    Raises:
        CheckpointError: unreadable or malformed.
    """
    try:
        text = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint manifest {path}: {error.strerror or error}") from error
    return CheckpointManifest.from_json(text, path=path)


def _folders(directory: Path, job_id: str) -> list[tuple[tuple[int, int], Path]]:
    """((term, step), folder) of every checkpoint folder of the job, oldest first."""
    root = job_folder(directory, job_id)
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in root.iterdir():
            match = _FOLDER.match(entry.name)
            if match and entry.is_dir():
                found.append(((int(match.group(2)), int(match.group(1))), entry))
    return sorted(found)


def complete_checkpoints(directory: Path, job_id: str) -> list[CheckpointManifest]:
    """Every complete checkpoint of ``job_id`` below ``directory``, newest (term, step) first.

    A folder without a manifest (a checkpoint interrupted while being written) is skipped, and so is
    one whose manifest is unreadable or names another job (with a warning).
    """
    manifests = []
    for _, folder in reversed(_folders(directory, job_id)):
        path = folder / MANIFEST_NAME
        if not path.is_file():
            continue
        try:
            manifest = read_manifest(path)
        except CheckpointError as error:
            logger.warning("ignoring checkpoint %s: %s", folder, error)
            continue
        if manifest.job_id != job_id:
            logger.warning("ignoring checkpoint %s: it belongs to job %r", folder, manifest.job_id)
            continue
        manifests.append(manifest)
    return manifests


def newest_first(manifests: Iterable[CheckpointManifest]) -> list[CheckpointManifest]:
    """Manifests ordered newest (term, then step) first, as `complete_checkpoints` returns them."""
    return sorted(manifests, key=lambda m: (m.term, m.step), reverse=True)


def latest_complete(directory: Path, job_id: str) -> CheckpointManifest | None:
    """The newest complete checkpoint of ``job_id`` (by term, then step), or None.

    Its shards are not read here: `verify` checks them.
    """
    manifests = complete_checkpoints(directory, job_id)
    return manifests[0] if manifests else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problem(folder: Path, entry: ShardEntry) -> str | None:
    """Why one shard file does not match its manifest entry (missing, size, checksum), or None."""
    path = folder / entry.file
    try:
        size = path.stat().st_size
        if size != entry.size:
            return f"{entry.file} has {size} bytes, the manifest says {entry.size}"
        if _sha256(path) != entry.sha256:
            return f"{entry.file} does not match its SHA-256"
    except FileNotFoundError:
        return f"{entry.file} is missing"
    except OSError as error:
        return f"{entry.file} cannot be read: {error.strerror or error}"
    return None


def _folder_of(manifest: CheckpointManifest, directory: Path | None) -> Path:
    if directory is None:
        return manifest.folder
    return checkpoint_folder(directory, manifest.job_id, step=manifest.step, term=manifest.term)


def verify(manifest: CheckpointManifest, directory: Path | None = None) -> list[str]:
    """File names of the manifest's shards that are missing, of the wrong size or fail their SHA-256.

    Args:
        manifest: a complete checkpoint's manifest.
        directory: the device's checkpoint directory (as given to `latest_complete`); None = the
            folder the manifest was read from.
    """
    folder = _folder_of(manifest, directory)
    bad = []
    for entry in manifest.shards:
        problem = shard_problem(folder, entry)
        if problem is not None:
            logger.warning("checkpoint %s: %s", folder, problem)
            bad.append(entry.file)
    return bad


def load_full_state(manifest: CheckpointManifest, directory: Path | None = None) -> FullState:
    """The whole model's parameters and optimizer state at the checkpoint, keyed by full names
    (tensor-parallel slices reassembled, one data-parallel replica), for `Driver.run(resume=...)`.

    Raises:
        CheckpointError: a shard needed is missing or corrupt (and no replica of it is intact).
    """
    # Imported here so that this module (manifests, files) stays torch-free for the daemon.
    from cetd.runtime.checkpoint_state import read_full_state

    return read_full_state(manifest, _folder_of(manifest, directory))


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (what `ShardEntry.sha256` holds)."""
    return hashlib.sha256(data).hexdigest()


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def prune(directory: Path, job_id: str, *, keep: int) -> list[Path]:
    """Keep the ``keep`` newest complete checkpoints of the job; delete older ones, and incomplete
    folders older than the newest complete one (never one that may still be being written).

    Returns:
        The folders deleted.
    """
    folders = _folders(directory, job_id)
    complete = [order for order, folder in folders if (folder / MANIFEST_NAME).is_file()]
    if not complete:
        return []
    kept = set(complete[-keep:])
    newest = complete[-1]
    removed = []
    for order, folder in folders:
        if order in kept or order > newest:
            continue
        _remove(folder)
        removed.append(folder)
    return removed


def prune_replicas(directory: Path, job_id: str, *, keep: int) -> list[Path]:
    """A worker's retention of the shard replicas it keeps: the ``keep`` newest folders holding shards
    stay; in older folders the shard files go, and the folder when it is then empty. A folder with a
    manifest belongs to a driver on this device, whose `prune` manages it.

    Returns:
        The shard files deleted.
    """
    with_shards = [(order, folder) for order, folder in _folders(directory, job_id) if _shards_in(folder)]
    removed = []
    for _, folder in with_shards[:-keep] if keep > 0 else with_shards:
        if (folder / MANIFEST_NAME).exists():
            continue
        for shard in _shards_in(folder):
            with contextlib.suppress(OSError):
                shard.unlink()
                removed.append(shard)
        with contextlib.suppress(OSError):
            folder.rmdir()
    return removed


def _shards_in(folder: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return sorted(p for p in folder.iterdir() if _SHARD.match(p.name))
    return []
