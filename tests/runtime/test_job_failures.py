"""A job refuses bad input with one clear reason, and fails cleanly: no rank hangs, nothing is left behind.

Bad input is caught by `Driver.describe` before any worker is involved; a peer sending a tensor of the
wrong shape surfaces as `TransportError` and ends every rank; a non-finite loss is refused by every
worker (their parameters untouched), the driver raises `JobError` naming the step and tells the
workers to stop, and all of them return.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from cetd.errors import JobError
from cetd.runtime.driver import Driver
from cetd.runtime.job_protocol import build_share
from cetd.runtime.local_channel import LocalPeerChannel, make_local_channels, run_on_local_ranks
from cetd.runtime.spec import JobPlan, JobSpec, StepReport
from cetd.runtime.worker import build_meta_model, run_worker
from cetd.transport.channel import PeerChannel, SendHandle, TensorKey, TensorSpec, TransportError
from tests.runtime.test_job_harness import make_plan, run_job, run_reference, write_texts


def gpt2_spec(data: Path, **changes: object) -> JobSpec:
    settings: dict[str, object] = {
        "model": "gpt2-tiny",
        "data": str(data),
        "steps": 20,
        "global_batch": 8,
        "micro_batches": 4,
        "seq_len": 16,
        "lr": 1e-4,
        "seed": 3,
    }
    settings.update(changes)
    return JobSpec(**settings)  # type: ignore[arg-type]  # test overrides


# --- bad input: describe() refuses it with the reason ---------------------------------------------


@pytest.mark.timeout(30)
def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=f"no data file at {re.escape(str(tmp_path / 'nope.jsonl'))}"):
        Driver(gpt2_spec(tmp_path / "nope.jsonl")).describe()


@pytest.mark.timeout(30)
def test_malformed_line_is_named(tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(JobError, match=r"texts.jsonl, line 3: not valid JSON"):
        Driver(gpt2_spec(data)).describe()


@pytest.mark.timeout(30)
def test_line_without_text_is_named(tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "one"}\n{"txt": "two"}\n', encoding="utf-8")
    with pytest.raises(JobError, match=r'line 2: expected a string field "text"'):
        Driver(gpt2_spec(data)).describe()


@pytest.mark.timeout(30)
def test_empty_data_file(tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text("\n", encoding="utf-8")
    with pytest.raises(JobError, match="holds no examples"):
        Driver(gpt2_spec(data)).describe()


@pytest.mark.timeout(30)
def test_missing_model_folder(tmp_path: Path) -> None:
    data = write_texts(tmp_path / "texts.jsonl")
    with pytest.raises(JobError, match=f"no model folder at {re.escape(str(tmp_path / 'my-gpt2'))}"):
        Driver(gpt2_spec(data, model=str(tmp_path / "my-gpt2"))).describe()


@pytest.mark.timeout(30)
def test_sequence_longer_than_the_model_allows(tmp_path: Path) -> None:
    data = write_texts(tmp_path / "texts.jsonl")
    with pytest.raises(JobError, match="sequence length 65 exceeds the model's maximum of 64"):
        Driver(gpt2_spec(data, seq_len=65)).describe()


@pytest.mark.timeout(30)
def test_description_is_what_the_planner_needs(tmp_path: Path) -> None:
    description = Driver(gpt2_spec(write_texts(tmp_path / "texts.jsonl"))).describe()
    assert (description.family, description.task) == ("gpt2", "causal_lm")
    assert (description.num_blocks, description.hidden_size, description.num_heads) == (4, 64, 4)
    assert description.max_seq_len == 64
    # 256*64 (tied wte) + 64*64 (wpe) + 4 blocks + ln_f.
    block = 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + 2 * 64 + (64 * 256 + 256) + (256 * 64 + 64)
    assert description.block_parameter_count == block
    assert description.parameter_count == 256 * 64 + 64 * 64 + 4 * block + 2 * 64
    json.dumps(description.config)  # crosses to the workers as JSON


# --- a worker holds only its share ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_worker_builds_the_model_on_meta_and_materializes_only_its_stage(tmp_path: Path) -> None:
    description = Driver(gpt2_spec(write_texts(tmp_path / "texts.jsonl"))).describe()
    model, adapter = build_meta_model(description, dtype=torch.float32)
    assert all(p.is_meta for p in model.parameters())
    share = build_share(model, adapter, make_plan("pipeline", 2, num_blocks=4), 1, num_micro_batches=4)
    names = set(share.parameter_specs())
    assert {n.split(".")[2] for n in names if n.startswith("transformer.h.")} == {"0", "1"}
    assert "transformer.wte.weight" in names
    assert "transformer.ln_f.weight" not in names
    assert share.batch_fields == ["attention_mask", "input_ids"]
    last = build_share(model, adapter, make_plan("pipeline", 2, num_blocks=4), 2, num_micro_batches=4)
    assert last.batch_fields == ["attention_mask", "labels"]  # never the input tokens


# --- failures while training ----------------------------------------------------------------------


class _ShrinkingActivations:
    """A rank's channel that drops the last position of every activation it sends (a buggy peer)."""

    def __init__(self, inner: LocalPeerChannel) -> None:
        self._inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size

    def send(self, peer: int, key: TensorKey, tensor: torch.Tensor) -> SendHandle:
        if key.name == "act":
            tensor = tensor[:, :-1]
        return self._inner.send(peer, key, tensor)

    def recv(self, peer: int, key: TensorKey, spec: TensorSpec, timeout: float | None = None) -> torch.Tensor:
        return self._inner.recv(peer, key, spec, timeout)


@pytest.mark.timeout(60)
def test_a_peer_sending_the_wrong_shape_fails_every_rank(tmp_path: Path) -> None:
    spec = gpt2_spec(write_texts(tmp_path / "texts.jsonl"))
    plan = make_plan("pipeline", 2, num_blocks=4)
    driver = Driver(spec, recv_timeout=timedelta(seconds=30))
    description = driver.describe()
    reports: list[StepReport] = []
    finished: list[int] = []

    def body(channel: LocalPeerChannel) -> None:
        try:
            if channel.rank == 0:
                driver.run(plan, channel, reports.append)
            else:
                peer: PeerChannel = _ShrinkingActivations(channel) if channel.rank == 1 else channel
                run_worker(
                    spec, plan, channel.rank, description, peer, num_threads=1, recv_timeout=timedelta(seconds=30)
                )
        finally:
            finished.append(channel.rank)

    with pytest.raises(TransportError, match=r"expected .*act.* \[2, 16, 64\], got .*\[2, 15, 64\]"):
        run_on_local_ranks(3, body, timeout=timedelta(seconds=50))
    assert sorted(finished) == [0, 1, 2]
    assert reports == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("parallelism", "workers"), [("pipeline", 2), ("tensor", 2), ("data", 2), ("single", 1)])
def test_a_non_finite_loss_names_the_step_and_stops_every_rank(tmp_path: Path, parallelism: str, workers: int) -> None:
    spec = gpt2_spec(write_texts(tmp_path / "texts.jsonl"), lr=1e5, steps=12)
    expected = run_reference(spec).losses
    first_bad = next(step for step, loss in enumerate(expected, start=1) if not torch.isfinite(torch.tensor(loss)))
    assert first_bad == 7  # with this seed and data
    channels = make_local_channels(workers + 1)
    reports: list[StepReport] = []
    with pytest.raises(JobError, match=r"the loss is (nan|inf) at step (\d+)") as raised:
        run_job_on(spec, make_plan(parallelism, workers, num_blocks=4), channels, reports)
    found = re.search(r"at step (\d+)", str(raised.value))
    assert found is not None
    assert int(found.group(1)) == first_bad
    assert [r.step for r in reports] == list(range(1, first_bad))
    assert channels[0].undelivered() == []  # every worker took its stop


def run_job_on(spec: JobSpec, plan: JobPlan, channels: list[LocalPeerChannel], reports: list[StepReport]) -> None:
    """`run_job` on given channels, so the test can inspect them afterwards."""
    driver = Driver(spec, recv_timeout=timedelta(seconds=30))
    description = driver.describe()

    def body(channel: LocalPeerChannel) -> None:
        if channel.rank == 0:
            driver.run(plan, channel, reports.append)
        else:
            run_worker(
                spec, plan, channel.rank, description, channel, num_threads=1, recv_timeout=timedelta(seconds=30)
            )

    run_on_local_ranks(plan.world_size, body, timeout=timedelta(seconds=50), channels=channels)


@pytest.mark.timeout(60)
def test_a_failing_progress_callback_stops_the_workers(tmp_path: Path) -> None:
    spec = gpt2_spec(write_texts(tmp_path / "texts.jsonl"), steps=5)
    plan = make_plan("data", 2, num_blocks=4)
    driver = Driver(spec, recv_timeout=timedelta(seconds=30))
    description = driver.describe()

    def on_step(report: StepReport) -> None:
        if report.step == 3:
            raise JobError("cancelled by the user")

    def body(channel: LocalPeerChannel) -> None:
        if channel.rank == 0:
            driver.run(plan, channel, on_step)
        else:
            run_worker(
                spec, plan, channel.rank, description, channel, num_threads=1, recv_timeout=timedelta(seconds=30)
            )

    channels = make_local_channels(3)
    with pytest.raises(JobError, match="cancelled by the user"):
        run_on_local_ranks(3, body, timeout=timedelta(seconds=50), channels=channels)
    assert channels[0].undelivered() == []


@pytest.mark.timeout(60)
def test_job_runs_again_on_its_own_output(tmp_path: Path) -> None:
    data = write_texts(tmp_path / "texts.jsonl")
    first = run_job(gpt2_spec(data, steps=3, output=str(tmp_path / "tuned")), make_plan("data", 2, num_blocks=4))
    again = run_job(gpt2_spec(data, steps=3, model=str(tmp_path / "tuned")), make_plan("pipeline", 2, num_blocks=4))
    # The byte tokenizer is rebuilt from the saved config, so the second job continues where the first ended.
    assert again.result.losses[0] < first.result.losses[0]
