"""GPipe and 1F1B: completeness, dependency order, activation memory and bubble size against theory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cetd.runtime.schedules import (
    Action,
    ActionKind,
    build_schedule,
    gpipe,
    one_f_one_b,
    simulate,
)

SHAPES = [(stages, micro) for stages in (1, 2, 3, 4, 6) for micro in (1, 2, 3, 4, 8, 13)]
Builder = Callable[[int, int], list[list[Action]]]
BUILDERS: list[Builder] = [gpipe, one_f_one_b]

F, B = ActionKind.FORWARD, ActionKind.BACKWARD


@pytest.mark.timeout(30)
@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(("stages", "micro"), SHAPES)
def test_every_micro_batch_runs_forward_then_backward_once_per_stage(builder: Builder, stages: int, micro: int) -> None:
    schedule = builder(stages, micro)
    assert len(schedule) == stages
    for actions in schedule:
        assert sorted(a.micro_batch for a in actions if a.kind is F) == list(range(micro))
        assert sorted(a.micro_batch for a in actions if a.kind is B) == list(range(micro))
        for m in range(micro):
            assert actions.index(Action(F, m)) < actions.index(Action(B, m))
        # Backwards in micro-batch order: gradients accumulate in the single-device order.
        assert [a.micro_batch for a in actions if a.kind is B] == list(range(micro))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(("stages", "micro"), SHAPES)
def test_schedules_never_deadlock_and_bubbles_match_theory(builder: Builder, stages: int, micro: int) -> None:
    result = simulate(builder(stages, micro), forward_time=1.0, backward_time=2.0)
    # Uniform stages: (M + S - 1) slots of forward + backward; each stage idles (S - 1) slots.
    assert result.makespan == (micro + stages - 1) * 3.0
    assert result.idle == tuple([(stages - 1) * 3.0] * stages)
    assert result.bubble_fraction == pytest.approx((stages - 1) / (micro + stages - 1))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("stages", "micro"), SHAPES)
def test_1f1b_holds_at_most_stages_minus_index_activations(stages: int, micro: int) -> None:
    one_f = simulate(one_f_one_b(stages, micro)).peak_activations
    assert one_f == tuple(min(stages - s, micro) for s in range(stages))
    assert simulate(gpipe(stages, micro)).peak_activations == (micro,) * stages


def test_1f1b_shape_for_three_stages() -> None:
    rendered = [" ".join(str(a) for a in actions) for actions in one_f_one_b(3, 5)]
    assert rendered == [
        "F0 F1 F2 B0 F3 B1 F4 B2 B3 B4",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 B4",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4",
    ]
    assert [" ".join(str(a) for a in actions) for actions in gpipe(2, 2)] == ["F0 F1 B0 B1"] * 2


def test_unequal_stage_times_are_bounded_by_the_slowest_stage() -> None:
    # Stage 1 is 1.5x heavier (an LM head): the pipeline runs at the slowest stage's pace.
    result = simulate(one_f_one_b(2, 8), forward_time=[1.0, 1.5], backward_time=[2.0, 3.0])
    assert result.makespan == pytest.approx(3.0 + 8 * 4.5)
    assert result.busy == (24.0, 36.0)


def test_simulate_rejects_broken_schedules() -> None:
    with pytest.raises(ValueError, match="deadlocks"):
        # Stage 0 waits for the backward of micro-batch 0 before it sends micro-batch 1, which stage 1
        # needs before it runs that backward.
        simulate(
            [
                [Action(F, 0), Action(B, 0), Action(F, 1), Action(B, 1)],
                [Action(F, 0), Action(F, 1), Action(B, 0), Action(B, 1)],
            ]
        )
    with pytest.raises(ValueError, match="before its forward"):
        simulate([[Action(B, 0), Action(F, 0)]])
    with pytest.raises(ValueError, match="micro-batches"):
        simulate([[Action(F, 0), Action(B, 0), Action(B, 0)]])


def test_build_schedule_by_name() -> None:
    assert build_schedule("gpipe", 2, 3) == gpipe(2, 3)
    assert build_schedule("1f1b", 2, 3) == one_f_one_b(2, 3)
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        build_schedule("zero-bubble", 2, 3)  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(ValueError, match="at least one stage"):
        gpipe(0, 3)
