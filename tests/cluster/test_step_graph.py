"""The step graph's replay: program order per resource, inputs with delays, collectives, critical path."""

from __future__ import annotations

import pytest

from cetd.cluster.step_graph import NETWORK, StepGraph


@pytest.mark.timeout(10)
def test_a_resource_runs_its_tasks_in_order_and_waits_for_inputs_plus_delay() -> None:
    graph = StepGraph()
    graph.add("a1", "A", 1.0)
    graph.add("b1", "B", 0.5, after=[("a1", 0.25)])  # waits for a1, then the latency
    graph.add("b2", "B", 2.0)
    graph.add("a2", "A", 3.0)  # A is free at 1.0: it does not wait for B
    replay = graph.replay()
    assert replay.finish == pytest.approx({"a1": 1.0, "b1": 1.75, "b2": 3.75, "a2": 4.0})
    assert replay.makespan == pytest.approx(4.0)
    assert replay.critical == pytest.approx({"A": 4.0})
    assert replay.bottleneck == "A"


@pytest.mark.timeout(10)
def test_a_task_may_wait_for_one_added_later() -> None:
    graph = StepGraph()
    graph.add("backward 0", "stage 0", 2.0, after=[("backward 1", 0.0)])
    graph.add("backward 1", "stage 1", 1.0)
    assert graph.replay().finish == pytest.approx({"backward 1": 1.0, "backward 0": 3.0})


@pytest.mark.timeout(10)
def test_a_collective_starts_when_its_last_member_is_free_and_holds_them_all() -> None:
    graph = StepGraph()
    graph.add("fast", "A", 1.0)
    graph.add("slow", "B", 4.0)
    graph.add("all-reduce", ["A", "B"], 0.5)
    graph.add("optimizer A", "A", 0.25)
    graph.add("optimizer B", "B", 0.1)
    replay = graph.replay()
    assert replay.finish["all-reduce"] == pytest.approx(4.5)
    assert replay.makespan == pytest.approx(4.75)
    # What set the pace: B's 4 s of work, the collective, then A's optimizer step.
    assert replay.critical == pytest.approx({"B": 4.0, NETWORK: 0.5, "A": 0.25})


@pytest.mark.timeout(10)
def test_latency_on_the_critical_path_counts_as_network() -> None:
    graph = StepGraph()
    graph.add("send", "A", 0.1)
    graph.add("receive", "B", 0.1, after=[("send", 5.0)])
    replay = graph.replay()
    assert replay.makespan == pytest.approx(5.2)
    assert replay.bottleneck == NETWORK


@pytest.mark.timeout(10)
def test_the_critical_path_may_end_at_a_named_task() -> None:
    graph = StepGraph()
    graph.add("report", "A", 1.0)
    graph.add("announce", "driver", 0.5, after=[("report", 0.25)])
    graph.add("tail", "B", 10.0)  # finishes last, but nothing waits for it
    replay = graph.replay(end="announce")
    assert replay.makespan == pytest.approx(10.0)
    assert replay.critical == pytest.approx({"driver": 0.5, NETWORK: 0.25, "A": 1.0})
    assert graph.replay().bottleneck == "B"
    assert graph.seconds("announce") == 0.5
    with pytest.raises(ValueError, match="never added"):
        graph.replay(end="ghost")


@pytest.mark.timeout(10)
def test_deadlocks_and_bad_tasks_are_refused_with_the_reason() -> None:
    crossed = StepGraph()
    crossed.add("x", "A", 1.0, after=[("y", 0.0)])
    crossed.add("y", "A", 1.0)  # behind x on A, which waits for it
    with pytest.raises(ValueError, match="deadlocks"):
        crossed.replay()
    disordered = StepGraph()
    disordered.add("first", ["A", "B"], 1.0)
    disordered.add("second", ["B", "A"], 1.0)
    disordered.add("third", "A", 1.0)
    assert disordered.replay().makespan == pytest.approx(3.0)
    unknown = StepGraph()
    unknown.add("x", "A", 1.0, after=[("ghost", 0.0)])
    with pytest.raises(ValueError, match="unknown task"):
        unknown.replay()
    graph = StepGraph()
    graph.add("x", "A", 1.0)
    with pytest.raises(ValueError, match="added twice"):
        graph.add("x", "B", 1.0)
    with pytest.raises(ValueError, match="takes -1"):
        graph.add("y", "A", -1.0)
    with pytest.raises(ValueError, match="names no resource"):
        graph.add("z", [], 1.0)
    assert StepGraph().replay().makespan == 0.0
