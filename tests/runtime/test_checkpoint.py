"""Checkpoint files: manifest last, checksums, retention, a full disk, replicas, and the job spec's settings.

Real jobs (gpt2-tiny on local channels) write the checkpoints into ``tmp_path``; the full disk is a real
1 MiB tmpfs when the test runs as root (CI does), else the test is skipped and the monkeypatched
variant below still runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cetd.errors import JobError
from cetd.runtime.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointManifest,
    complete_checkpoints,
    latest_complete,
    load_full_state,
    prune,
    verify,
    write_file_atomic,
)
from cetd.runtime.checkpoint import write_manifest as write_manifest_for_real
from cetd.runtime.checkpoint_state import ShardMeta, decode_shard, split_full_tensor
from cetd.runtime.spec import JobSpec, from_json, to_json
from cetd.runtime.tensor_parallel import ShardSpec, gather_full_state_dict
from tests.runtime.test_job_harness import make_plan, write_texts
from tests.runtime.test_job_resume import JOB, job_spec, run_once


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("checkpoint-data") / "texts.jsonl")


def folders(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / JOB).iterdir())


# --- the job spec's settings -----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_checkpoint_settings_round_trip_and_are_checked() -> None:
    spec = JobSpec(model="gpt2-tiny", data="x", checkpoint_every=7, checkpoint_seconds=90.5, keep_checkpoints=2)
    again = from_json(JobSpec, to_json(spec))
    assert (again.checkpoint_every, again.checkpoint_seconds, again.keep_checkpoints) == (7, 90.5, 2)
    assert JobSpec(model="m", data="d").checkpoint_every == 5  # defaults
    old = '{"model": "m", "data": "d"}'  # a spec written before these fields existed
    assert from_json(JobSpec, old).keep_checkpoints == 3
    with pytest.raises(JobError, match="--keep-checkpoints must be at least 1, not 0"):
        JobSpec(model="m", data="d", keep_checkpoints=0)
    with pytest.raises(JobError, match="--checkpoint-every must not be negative"):
        JobSpec(model="m", data="d", checkpoint_every=-1)


# --- shard encoding --------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_tensor_parallel_slices_split_back_exactly() -> None:
    full = torch.arange(4 * 12, dtype=torch.float32).reshape(4, 12)
    fused = ShardSpec(dim=1, parts=3)  # q, k, v thirds of 4 columns each, cut 2 + 1 + 1 per third
    slices = split_full_tensor(full, fused, [6, 3, 3])
    assert [tuple(s.shape) for s in slices] == [(4, 6), (4, 3), (4, 3)]
    assert torch.equal(slices[1][0], torch.tensor([2.0, 6.0, 10.0]))  # column 2 of q, k and v
    rebuilt = gather_full_state_dict([{"w": s} for s in slices], {"w": fused})["w"]
    assert torch.equal(rebuilt, full)


@pytest.mark.timeout(60)
def test_shards_are_deterministic_and_describe_their_share(texts: Path, tmp_path: Path) -> None:
    outcome = run_once(job_spec(texts, steps=5), make_plan("tensor", 2, num_blocks=4), tmp_path)
    manifest = outcome.manifests[0]
    assert [(s.rank, s.device_id) for s in manifest.shards] == [(1, "D1"), (2, "D2")]
    meta, tensors = decode_shard((manifest.folder / "shard-rank2.safetensors").read_bytes())
    assert isinstance(meta, ShardMeta)
    assert (meta.step, meta.rank, meta.tp_index, meta.device_id) == (5, 2, 1, "D2")
    assert meta.layout["transformer.h.0.attn.c_attn.weight"] == (1, 3)
    assert tuple(tensors["param"]["transformer.h.0.attn.c_attn.weight"].shape) == (64, 96)  # half of 192
    assert float(tensors["step"]["transformer.wte.weight"]) == 5.0
    assert set(tensors["exp_avg"]) == set(tensors["param"]) == set(tensors["exp_avg_sq"])
    # The manifest's JSON is the file's text, and parses back to the same manifest.
    assert manifest.path is not None
    assert CheckpointManifest.from_json(manifest.path.read_text(), path=manifest.path) == manifest
    assert manifest.losses == tuple(r.loss for r in outcome.reports)


# --- atomicity: the manifest is written last -------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_crash_before_the_manifest_leaves_no_complete_checkpoint(
    texts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write_manifest = write_manifest_for_real
    seen: list[int] = []

    def write_manifest(folder: Path, manifest: CheckpointManifest) -> CheckpointManifest:
        # Every shard is complete on disk before the manifest is written, and no manifest is there yet.
        assert verify(manifest, tmp_path / "driver") == []
        assert not (folder / MANIFEST_NAME).exists()
        seen.append(manifest.step)
        if manifest.step == 10:  # the driver's device loses power here: keep what a crash would leave
            shutil.copytree(folder, tmp_path / "crash-copy")
            raise KeyboardInterrupt
        return real_write_manifest(folder, manifest)

    monkeypatch.setattr("cetd.runtime.checkpoint_writer.write_manifest", write_manifest)
    with contextlib.suppress(KeyboardInterrupt):
        run_once(job_spec(texts, steps=12), make_plan("data", 2, num_blocks=4), tmp_path)
    assert seen == [5, 10]
    crashed = tmp_path / "driver" / JOB / "step-00000010-term-0"
    assert not crashed.exists()  # the driver removed the incomplete folder on its way out...
    shutil.copytree(tmp_path / "crash-copy", crashed)  # ...a crash would have left it like this
    assert sorted(p.name for p in crashed.iterdir()) == ["shard-rank1.safetensors", "shard-rank2.safetensors"]
    latest = latest_complete(tmp_path / "driver", JOB)
    assert latest is not None
    assert latest.step == 5
    assert [m.step for m in complete_checkpoints(tmp_path / "driver", JOB)] == [5]
    assert prune(tmp_path / "driver", JOB, keep=1) == []  # never deletes one newer than the newest complete


# --- checksums -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_checksums_catch_a_flipped_byte_and_a_truncated_shard(texts: Path, tmp_path: Path) -> None:
    run_once(job_spec(texts, steps=5), make_plan("data", 2, num_blocks=4), tmp_path / "data")
    run_once(job_spec(texts, steps=5), make_plan("pipeline", 2, num_blocks=4), tmp_path / "pipe")
    data = latest_complete(tmp_path / "data" / "driver", JOB)
    pipe = latest_complete(tmp_path / "pipe" / "driver", JOB)
    assert data is not None
    assert pipe is not None
    intact = load_full_state(data)

    first = data.folder / "shard-rank1.safetensors"
    raw = bytearray(first.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, in the tensor data
    first.write_bytes(bytes(raw))
    assert verify(data) == ["shard-rank1.safetensors"]
    # Data parallel: the other replica of the share stands in for the corrupt one.
    again = load_full_state(data)
    assert all(torch.equal(again.parameters[n], t) for n, t in intact.parameters.items())
    assert all(torch.equal(again.optimizer[n].exp_avg_sq, s.exp_avg_sq) for n, s in intact.optimizer.items())

    second = data.folder / "shard-rank2.safetensors"
    second.write_bytes(second.read_bytes()[:-100])
    assert verify(data) == ["shard-rank1.safetensors", "shard-rank2.safetensors"]
    with pytest.raises(CheckpointError, match=r"cannot be loaded: .*SHA-256.*has \d+ bytes, the manifest says"):
        load_full_state(data)

    (pipe.folder / "shard-rank2.safetensors").unlink()
    assert verify(pipe, tmp_path / "pipe" / "driver") == ["shard-rank2.safetensors"]
    with pytest.raises(CheckpointError, match=r"shard-rank2\.safetensors is missing"):
        load_full_state(pipe, tmp_path / "pipe" / "driver")


# --- retention -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_retention_keeps_the_newest_n_on_the_driver_and_on_every_worker(texts: Path, tmp_path: Path) -> None:
    spec = replace(job_spec(texts, steps=12), checkpoint_every=2, keep_checkpoints=3)
    outcome = run_once(spec, make_plan("pipeline", 2, num_blocks=4), tmp_path)
    assert [m.step for m in outcome.manifests] == [2, 4, 6, 8, 10, 12]
    kept = ["step-00000008-term-0", "step-00000010-term-0", "step-00000012-term-0"]
    assert folders(tmp_path / "driver") == kept
    assert folders(tmp_path / "D1") == kept
    assert folders(tmp_path / "D2") == kept
    assert [m.step for m in complete_checkpoints(tmp_path / "driver", JOB)] == [12, 10, 8]


# --- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted on a fresh folder (root only), unmounted afterwards."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.timeout(60)
def test_a_full_disk_fails_the_checkpoint_with_a_clear_reason_and_no_manifest(texts: Path, tiny_tmpfs: Path) -> None:
    # Each pipeline shard (parameters and two AdamW moments) is about 1.3 MB: the first one fills the disk.
    plan = make_plan("pipeline", 2, num_blocks=4)
    outcome = run_once(job_spec(texts, steps=12), plan, tiny_tmpfs.parent / "workers", driver_dir=tiny_tmpfs)
    error = outcome.error
    assert isinstance(error, CheckpointError)
    assert isinstance(error, JobError)  # the daemon pauses the job with this sentence
    message = str(error)
    assert message.startswith("checkpoint at step 5 could not be written: no space left on device (")
    assert str(tiny_tmpfs) in message
    assert "\n" not in message
    assert [r.step for r in outcome.reports] == [1, 2, 3, 4, 5]
    assert outcome.worker_errors == {}  # every worker took its stop
    assert list(tiny_tmpfs.rglob(MANIFEST_NAME)) == []
    assert list(tiny_tmpfs.rglob("*.safetensors")) == []  # the partial checkpoint is gone, space is free
    assert list(tiny_tmpfs.rglob("*.tmp")) == []
    assert latest_complete(tiny_tmpfs, JOB) is None


@pytest.mark.timeout(10)
def test_an_atomic_write_on_a_full_disk_keeps_the_old_file(tiny_tmpfs: Path) -> None:
    target = tiny_tmpfs / "shard.safetensors"
    write_file_atomic(target, b"old contents")
    with pytest.raises(OSError, match="No space left on device") as raised:
        write_file_atomic(target, bytes(2 * 1024 * 1024))
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["shard.safetensors"]  # no temp file left


@pytest.mark.timeout(60)
def test_a_full_disk_simulated_in_the_second_shard(
    texts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same as the tmpfs test for machines where mounting is not allowed: ENOSPC raised by the write."""
    real = write_file_atomic

    def write_file_atomic_filling_up(path: Path, data: bytes) -> None:
        if path.name == "shard-rank2.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr("cetd.runtime.checkpoint_writer.write_file_atomic", write_file_atomic_filling_up)
    outcome = run_once(job_spec(texts, steps=12), make_plan("pipeline", 2, num_blocks=4), tmp_path)
    folder = tmp_path / "driver" / JOB / "step-00000005-term-0"
    assert str(outcome.error) == (
        f"checkpoint at step 5 could not be written: no space left on device ({folder / 'shard-rank2.safetensors'})"
    )
    assert not folder.exists()  # shard 1 was written, then removed with the incomplete folder
    assert outcome.worker_errors == {}


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_keep_its_replica_still_completes_the_checkpoint(
    texts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = write_file_atomic

    def full_on_d2(path: Path, data: bytes) -> None:
        if "/D2/" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr("cetd.runtime.worker.write_file_atomic", full_on_d2)
    outcome = run_once(job_spec(texts, steps=5), make_plan("data", 2, num_blocks=4), tmp_path)
    assert outcome.error is None
    manifest = outcome.manifests[0]
    # The manifest says which device keeps a replica: D2 could not.
    assert [(s.rank, s.device_id) for s in manifest.shards] == [(1, "D1"), (2, "")]
    assert verify(manifest) == []


@pytest.mark.timeout(60)
def test_checkpoints_by_time_alone(texts: Path, tmp_path: Path) -> None:
    spec = replace(job_spec(texts, steps=3), checkpoint_every=0, checkpoint_seconds=1e-6)
    outcome = run_once(spec, make_plan("single", 1, num_blocks=4), tmp_path)
    assert [m.step for m in outcome.manifests] == [1, 2, 3]
    never = run_once(replace(spec, checkpoint_seconds=0.0), make_plan("single", 1, num_blocks=4), tmp_path / "off")
    assert never.manifests == []


@pytest.mark.timeout(30)
def test_the_file_side_imports_without_torch() -> None:
    """The daemon finds, verifies and prunes checkpoints without importing torch."""
    code = "import sys, cetd.runtime.checkpoint; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
