"""A stage host's link is cut mid-job (separate hosts in namespaces): heartbeats stop, the step is aborted,
the job resumes on the hosts left and ends as if nothing had happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.reference import max_param_gap, reference_run, write_text_data
from tests.integration.rig import Household, wait_until

from .netns import NetnsRig, requires_root

pytestmark = [pytest.mark.netns, pytest.mark.slow, requires_root]

STEPS = 60


@pytest.mark.timeout(400)
def test_link_cut_of_a_stage_host(tmp_path: Path) -> None:
    data = write_text_data(tmp_path / "text.jsonl")
    output = tmp_path / "out"
    with NetnsRig(3) as rig:
        hosts = [h.ip for h in rig.hosts]
        prefixes = [["ip", "netns", "exec", h.netns] for h in rig.hosts]
        with Household.create(tmp_path / "house", 3, hosts=hosts, prefixes=prefixes,
                              extra={"training": {"worker_threads": 1}}) as household:
            household.start_all()
            wait_until(household.agreed_coordinator, 20, interval=0.3, what="a coordinator")
            submitter = household.daemons[0]
            process = submitter.submit("--model", "gpt2-tiny", "--data", str(data), "--steps", str(STEPS), "--batch",
                                       "8", "--micro-batches", "4", "--seq-len", "16", "--lr", "1e-4", "--seed", "3",
                                       "--parallelism", "pipeline", "--devices", "3", "--checkpoint-every", "5",
                                       "--output", str(output))
            assert process.stdout is not None
            first = json.loads(process.stdout.readline())
            lines = [process.stdout.readline() for _ in range(9)]  # let a few steps pass
            coordinator = household.agreed_coordinator()
            assert coordinator is not None
            victim = next(i for i, d in enumerate(household.daemons)
                          if i != 0 and d.device_id != coordinator[1])
            rig.link_down(victim)  # the host is still running, just unreachable
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr
            events = [first, *(json.loads(line) for line in lines + stdout.splitlines() if line.strip())]
    ref_losses, ref_state, _ = reference_run("gpt2-tiny", data, steps=STEPS, seed=3)
    steps = [e for e in events if e.get("event") == "step"]
    assert {e["step"] for e in steps} == set(range(1, STEPS + 1))
    assert max(abs(e["loss"] - ref_losses[e["step"] - 1]) for e in steps) <= 1e-5
    assert max_param_gap(output, ref_state, causal=True) <= 1e-5
    finished = events[-1]["job"]
    assert finished["state"] == "succeeded"
