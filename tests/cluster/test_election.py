"""Election state machine: unit rules, then a simulated cluster with kills, restarts, partitions, loss.

The simulator runs N `Election`s, each with its own `MembershipTable`, exchanging heartbeats that
carry the sender's rank and adopted claim. Time advances in 0.1 s steps; each node heartbeats every
peer in its partition every 0.5 s; messages are dropped at random with a seeded generator.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cetd.cluster.election import Candidate, Claim, Election, ElectionConfig, Role
from cetd.cluster.membership import FailureDetectorConfig, MembershipTable
from cetd.errors import ConfigError, StaleTermError
from cetd.ids import DeviceId, Term

DT = 0.1
HEARTBEAT = 0.5
GRACE = 1.5
DEAD_AFTER = 3.0


def dev(name: str) -> DeviceId:
    return DeviceId(name)


def role_of(election: Election) -> Role:
    """The role read through a call, so that mypy does not narrow the property across asserts."""
    return election.role


def claim(term: int, rank: float, device_id: str) -> Claim:
    return Claim(term=Term(term), coordinator_rank=rank, coordinator_id=dev(device_id))


# ---------------------------------------------------------------- unit rules


@pytest.mark.timeout(10)
def test_candidate_order_is_rank_then_device_id() -> None:
    assert Candidate(rank=2.0, device_id=dev("A")) > Candidate(rank=1.0, device_id=dev("Z"))
    assert Candidate(rank=1.0, device_id=dev("B")) > Candidate(rank=1.0, device_id=dev("A"))


@pytest.mark.timeout(10)
def test_claim_order_is_term_then_rank_then_device_id() -> None:
    ordered = [
        claim(1, 9.0, "Z"),
        claim(2, 0.5, "A"),
        claim(2, 1.0, "A"),
        claim(2, 1.0, "B"),
        claim(3, 0.0, "A"),
    ]
    assert sorted(reversed(ordered)) == ordered
    assert str(claim(4, 1.0, "Y")) == "term 4 of Y"
    assert claim(4, 1.0, "Y").candidate == Candidate(rank=1.0, device_id=dev("Y"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("term", "rank", "device_id", "message"),
    [
        (0, 1.0, "A", "at least 1"),
        (1, float("nan"), "A", "finite"),
        (1, float("inf"), "A", "finite"),
        (1, 1.0, "", "name"),
    ],
)
def test_malformed_claims_are_refused(term: int, rank: float, device_id: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        claim(term, rank, device_id)
    with pytest.raises(ValueError, match="finite"):
        Candidate(rank=float("nan"), device_id=dev("A"))


@pytest.mark.timeout(10)
def test_config_rejects_negative_graces() -> None:
    with pytest.raises(ConfigError):
        ElectionConfig(startup_grace=timedelta(seconds=-1))
    with pytest.raises(ConfigError):
        ElectionConfig(new_claim_grace=timedelta(seconds=-1))
    assert ElectionConfig().startup_grace == timedelta(seconds=1.5)


@pytest.mark.timeout(10)
def test_lone_node_claims_term_one_only_after_grace() -> None:
    election = Election(dev("A"), 1.0)
    assert election.tick(0.0, {}) is None
    assert election.tick(1.4, {}) is None
    assert role_of(election) is Role.CANDIDATE
    assert election.term == 0
    assert election.tick(1.5, {}) == claim(1, 1.0, "A")
    assert role_of(election) is Role.COORDINATOR
    assert election.coordinator_id == "A"
    # Claiming is idempotent: later ticks keep the same claim.
    assert election.tick(9.0, {}) == claim(1, 1.0, "A")


@pytest.mark.timeout(10)
def test_node_that_is_not_best_waits_for_the_best() -> None:
    election = Election(dev("A"), 1.0, ElectionConfig(startup_grace=timedelta(0)))
    assert election.tick(0.0, {dev("B"): 2.0}) is None
    assert role_of(election) is Role.CANDIDATE
    # Equal rank: the larger device ID is the better candidate.
    assert election.tick(0.1, {dev("B"): 1.0}) is None
    assert election.tick(0.2, {dev("0"): 1.0, dev("A"): 99.0}) == claim(1, 1.0, "A")  # self is ignored


@pytest.mark.timeout(10)
def test_coordinator_steps_down_on_higher_claim_at_once() -> None:
    election = Election(dev("A"), 5.0, ElectionConfig(startup_grace=timedelta(0)))
    assert election.tick(0.0, {dev("B"): 1.0}) == claim(1, 5.0, "A")
    assert election.on_claim(claim(1, 6.0, "B")) is True  # same term, better rank: B wins
    assert role_of(election) is Role.FOLLOWER
    assert election.coordinator_id == "B"
    assert election.on_claim(claim(1, 5.0, "A")) is False
    assert election.on_claim(claim(1, 6.0, "B")) is False


@pytest.mark.timeout(10)
def test_follower_of_dead_coordinator_claims_next_term() -> None:
    election = Election(dev("A"), 2.0, ElectionConfig(startup_grace=timedelta(0)))
    election.on_claim(claim(7, 9.0, "C"))
    assert election.tick(0.0, {dev("C"): 9.0, dev("B"): 1.0}) == claim(7, 9.0, "C")
    assert role_of(election) is Role.FOLLOWER
    assert election.tick(5.0, {dev("B"): 1.0}) == claim(8, 2.0, "A")
    assert election.term == 8


@pytest.mark.timeout(10)
def test_new_claim_is_presumed_alive_until_its_coordinator_could_have_been_heard() -> None:
    # The claim arrived through B's heartbeat; C's own heartbeat has not reached A yet.
    election = Election(dev("A"), 5.0, ElectionConfig(startup_grace=timedelta(0)))
    election.on_claim(claim(2, 3.0, "C"))
    assert role_of(election) is Role.FOLLOWER
    assert election.tick(10.0, {dev("B"): 1.0}) == claim(2, 3.0, "C")
    assert election.tick(11.4, {dev("B"): 1.0}) == claim(2, 3.0, "C")
    assert election.tick(11.5, {dev("B"): 1.0}) == claim(3, 5.0, "A")  # C never showed up


@pytest.mark.timeout(10)
def test_no_preemption_by_better_device() -> None:
    election = Election(dev("A"), 1.0, ElectionConfig(startup_grace=timedelta(0)))
    assert election.tick(0.0, {}) == claim(1, 1.0, "A")
    assert election.tick(1.0, {dev("Z"): 100.0}) == claim(1, 1.0, "A")
    assert role_of(election) is Role.COORDINATOR


@pytest.mark.timeout(10)
def test_claim_of_previous_incarnation_is_replaced_with_higher_term() -> None:
    election = Election(dev("A"), 1.0)  # fresh daemon, within its grace
    election.on_claim(claim(3, 1.0, "A"))  # the others still follow A's pre-restart claim
    assert role_of(election) is Role.CANDIDATE  # it does not resume it ...
    assert election.tick(0.0, {dev("B"): 2.0}) == claim(4, 1.0, "A")  # ... it claims anew at once
    assert role_of(election) is Role.COORDINATOR


@pytest.mark.timeout(10)
def test_stale_commands_are_refused() -> None:
    election = Election(dev("A"), 1.0)
    election.validate_command(2, dev("X"))  # nothing adopted yet: nothing is stale ...
    with pytest.raises(StaleTermError, match="stale term 1 from W: following term 2 of X"):
        election.validate_command(1, dev("W"))  # ... but once obeyed, older terms are
    election.on_claim(claim(4, 2.0, "Y"))
    election.validate_command(4, dev("Y"))
    with pytest.raises(StaleTermError, match=r"^stale term 3 from X: following term 4 of Y$"):
        election.validate_command(3, dev("X"))
    with pytest.raises(StaleTermError, match="stale term 4 from X: following term 4 of Y"):
        election.validate_command(4, dev("X"))
    # A higher term is newer by definition: obeyed, and from then on the older term is stale.
    election.validate_command(5, dev("Z"))
    assert election.term == 4  # heartbeats still carry the adopted claim, term and coordinator together
    with pytest.raises(StaleTermError, match="stale term 4 from Y: following term 5 of Z"):
        election.validate_command(4, dev("Y"))
    election.validate_command(5, dev("Z"))
    # Once the claim arrives the floor is no longer needed; a new claim outranks both.
    election.on_claim(claim(5, 3.0, "Z"))
    election.validate_command(5, dev("Z"))
    assert election.tick(0.0, {}) == claim(5, 3.0, "Z")  # just adopted: presumed alive
    assert election.tick(10.0, {}) == claim(6, 1.0, "A")


@pytest.mark.timeout(10)
def test_own_claim_exceeds_a_term_learnt_from_a_command() -> None:
    election = Election(dev("A"), 1.0, ElectionConfig(startup_grace=timedelta(0)))
    election.on_claim(claim(2, 1.0, "B"))
    election.validate_command(6, dev("C"))
    assert election.tick(0.0, {}) == claim(2, 1.0, "B")  # just adopted: presumed alive
    assert election.tick(5.0, {}) == claim(7, 1.0, "A")


# ---------------------------------------------------------------- simulator


@dataclass
class SimNode:
    election: Election
    table: MembershipTable[float]
    rank: float
    phase: float
    terms_seen: list[int] = field(default_factory=list)


class SimCluster:
    """N elections exchanging heartbeats in memory, with partitions, kills, restarts and loss."""

    def __init__(self, ranks: dict[str, float], *, loss: float = 0.0, seed: int = 0) -> None:
        self.ranks = {dev(name): rank for name, rank in ranks.items()}
        self.loss = loss
        self.rng = random.Random(seed)
        self.now = 0.0
        self.step_index = 0
        self.nodes: dict[DeviceId, SimNode] = {}
        self.group: dict[DeviceId, int] = {}
        for device_id in self.ranks:
            self.start(device_id)

    def start(self, device_id: DeviceId) -> None:
        """Start (or restart) a node with a fresh daemon: term 0, empty table, new grace period."""
        self.nodes[device_id] = SimNode(
            election=Election(device_id, self.ranks[device_id], ElectionConfig(startup_grace=timedelta(seconds=GRACE))),
            table=MembershipTable(FailureDetectorConfig()),
            rank=self.ranks[device_id],
            phase=self.rng.randrange(5),
        )
        self.group.setdefault(device_id, 0)

    def kill(self, device_id: DeviceId) -> None:
        self.nodes.pop(device_id, None)

    def partition(self, *groups: Iterable[str]) -> None:
        for index, members in enumerate(groups):
            for name in members:
                self.group[dev(name)] = index

    def heal(self) -> None:
        self.group = dict.fromkeys(self.group, 0)

    def connected(self, a: DeviceId, b: DeviceId) -> bool:
        return self.group[a] == self.group[b]

    def step(self) -> None:
        self.step_index += 1
        self.now = round(self.step_index * DT, 6)
        for sender_id, sender in list(self.nodes.items()):
            if (self.step_index + sender.phase) % round(HEARTBEAT / DT):
                continue
            adopted = sender.election.adopted
            for receiver_id, receiver in self.nodes.items():
                if receiver_id == sender_id or not self.connected(sender_id, receiver_id):
                    continue
                if self.loss and self.rng.random() < self.loss:
                    continue
                receiver.table.observe(sender_id, sender.rank, self.now)
                if adopted is not None:
                    receiver.election.on_claim(adopted)
        for node in self.nodes.values():
            node.election.tick(self.now, node.table.present(self.now))
            node.terms_seen.append(node.election.term)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / DT)):
            self.step()

    def views(self) -> dict[DeviceId, tuple[DeviceId | None, int]]:
        return {device_id: (n.election.coordinator_id, n.election.term) for device_id, n in self.nodes.items()}

    def coordinators(self) -> set[DeviceId]:
        return {device_id for device_id, n in self.nodes.items() if n.election.role is Role.COORDINATOR}

    def components(self) -> list[set[DeviceId]]:
        by_group: dict[int, set[DeviceId]] = {}
        for device_id in self.nodes:
            by_group.setdefault(self.group[device_id], set()).add(device_id)
        return list(by_group.values())


FOUR = {"A": 1.0, "B": 4.0, "C": 2.0, "D": 3.0}


@pytest.mark.timeout(30)
def test_four_nodes_elect_the_best_ranked_after_grace() -> None:
    cluster = SimCluster(FOUR)
    cluster.run(GRACE - DT)
    assert cluster.coordinators() == set()
    assert all(view == (None, 0) for view in cluster.views().values())
    cluster.run(1.0)
    assert cluster.coordinators() == {dev("B")}
    assert set(cluster.views().values()) == {(dev("B"), 1)}
    roles = {device_id: n.election.role for device_id, n in cluster.nodes.items()}
    assert roles == {
        dev("A"): Role.FOLLOWER,
        dev("B"): Role.COORDINATOR,
        dev("C"): Role.FOLLOWER,
        dev("D"): Role.FOLLOWER,
    }


@pytest.mark.timeout(30)
def test_equal_ranks_elect_the_largest_device_id() -> None:
    cluster = SimCluster({"A": 1.0, "B": 1.0, "C": 1.0})
    cluster.run(3.0)
    assert set(cluster.views().values()) == {(dev("C"), 1)}


@pytest.mark.timeout(30)
def test_killed_coordinator_is_replaced_by_best_survivor_with_higher_term() -> None:
    cluster = SimCluster(FOUR)
    cluster.run(3.0)
    cluster.kill(dev("B"))
    killed_at = cluster.now
    # Nobody reacts while B is merely suspect.
    cluster.run(DEAD_AFTER - HEARTBEAT - DT)
    assert set(cluster.views().values()) == {(dev("B"), 1)}
    while cluster.views()[dev("D")] != (dev("D"), 2):
        cluster.step()
        assert cluster.now - killed_at < DEAD_AFTER + 2 * HEARTBEAT, "failover took too long"
    cluster.run(2 * HEARTBEAT)
    assert set(cluster.views().values()) == {(dev("D"), 2)}
    assert cluster.coordinators() == {dev("D")}


@pytest.mark.timeout(30)
def test_restarted_old_coordinator_follows_the_new_one() -> None:
    cluster = SimCluster(FOUR)
    cluster.run(3.0)
    cluster.kill(dev("B"))
    cluster.run(DEAD_AFTER + 2.0)
    assert set(cluster.views().values()) == {(dev("D"), 2)}
    cluster.start(dev("B"))
    assert cluster.nodes[dev("B")].election.term == 0
    cluster.run(10.0)
    assert set(cluster.views().values()) == {(dev("D"), 2)}
    assert cluster.nodes[dev("B")].election.role is Role.FOLLOWER
    assert cluster.coordinators() == {dev("D")}


@pytest.mark.timeout(30)
def test_coordinator_restarting_before_being_declared_dead_reclaims_with_new_term() -> None:
    cluster = SimCluster(FOUR)
    cluster.run(3.0)
    cluster.kill(dev("B"))
    cluster.run(1.0)
    cluster.start(dev("B"))
    cluster.run(3.0)
    assert set(cluster.views().values()) == {(dev("B"), 2)}
    assert cluster.coordinators() == {dev("B")}


@pytest.mark.timeout(30)
def test_better_device_joining_later_does_not_preempt() -> None:
    cluster = SimCluster({**FOUR, "E": 10.0})
    cluster.kill(dev("E"))
    cluster.run(3.0)
    cluster.start(dev("E"))
    cluster.run(10.0)
    assert set(cluster.views().values()) == {(dev("B"), 1)}


@pytest.mark.timeout(30)
def test_restarted_coordinator_outranked_by_a_newcomer_still_reclaims() -> None:
    cluster = SimCluster({**FOUR, "E": 10.0})
    cluster.kill(dev("E"))
    cluster.run(3.0)
    cluster.start(dev("E"))
    cluster.run(2.0)
    cluster.start(dev("B"))  # restarted before anybody declared it dead; E is the better device now
    cluster.run(5.0)
    assert set(cluster.views().values()) == {(dev("B"), 2)}
    assert cluster.coordinators() == {dev("B")}


@pytest.mark.timeout(30)
def test_two_two_partition_elects_on_the_minority_side_and_heals_to_the_higher_term() -> None:
    cluster = SimCluster(FOUR)
    cluster.run(3.0)
    cluster.partition("AB", "CD")
    cluster.run(DEAD_AFTER + 2.0)
    views = cluster.views()
    assert {views[dev("A")], views[dev("B")]} == {(dev("B"), 1)}
    assert {views[dev("C")], views[dev("D")]} == {(dev("D"), 2)}
    assert cluster.coordinators() == {dev("B"), dev("D")}
    # B's side refuses nothing yet; D's side refuses B's commands.
    with pytest.raises(StaleTermError, match="stale term 1 from B: following term 2 of D"):
        cluster.nodes[dev("C")].election.validate_command(1, dev("B"))
    cluster.heal()
    cluster.run(2 * HEARTBEAT)
    assert set(cluster.views().values()) == {(dev("D"), 2)}
    assert cluster.coordinators() == {dev("D")}
    for follower in "ABC":
        with pytest.raises(StaleTermError):
            cluster.nodes[dev(follower)].election.validate_command(1, dev("B"))
        cluster.nodes[dev(follower)].election.validate_command(2, dev("D"))


@pytest.mark.timeout(30)
def test_both_sides_electing_the_same_term_resolve_by_rank() -> None:
    cluster = SimCluster({"A": 1.0, "B": 4.0, "C": 2.0, "D": 3.0, "E": 0.5})
    cluster.run(3.0)
    # B (the coordinator) dies and the rest split before anyone notices: both sides elect term 2.
    cluster.kill(dev("B"))
    cluster.partition("AC", "DE", "B")
    cluster.run(DEAD_AFTER + 2.0)
    views = cluster.views()
    assert views[dev("A")] == views[dev("C")] == (dev("C"), 2)
    assert views[dev("D")] == views[dev("E")] == (dev("D"), 2)
    cluster.heal()
    cluster.run(2 * HEARTBEAT)
    assert set(cluster.views().values()) == {(dev("D"), 2)}
    assert cluster.coordinators() == {dev("D")}


@pytest.mark.timeout(30)
def test_election_converges_under_message_loss() -> None:
    cluster = SimCluster(FOUR, loss=0.2, seed=7)
    cluster.run(6.0)
    assert cluster.coordinators() == {dev("B")}
    assert {view[0] for view in cluster.views().values()} == {dev("B")}


# ---------------------------------------------------------------- property test

NAMES = ["A", "B", "C", "D", "E"]

action = st.one_of(
    st.tuples(st.just("kill"), st.sampled_from(NAMES)),
    st.tuples(st.just("start"), st.sampled_from(NAMES)),
    st.tuples(st.just("restart"), st.sampled_from(NAMES)),
    st.tuples(st.just("partition"), st.lists(st.integers(0, 2), min_size=len(NAMES), max_size=len(NAMES))),
    st.tuples(st.just("heal"), st.none()),
    st.tuples(st.just("run"), st.floats(0.1, 6.0)),
)


@pytest.mark.timeout(120)
@settings(
    # Deterministic in CI; CETD_ELECTION_EXAMPLES=5000 explores further by hand.
    max_examples=int(os.environ.get("CETD_ELECTION_EXAMPLES", "300")),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ranks=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=len(NAMES), max_size=len(NAMES)),
    actions=st.lists(action, max_size=12),
    loss=st.sampled_from([0.0, 0.1, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_after_quiescence_connected_nodes_agree_and_terms_never_decrease(
    ranks: list[float], actions: list[tuple[str, object]], loss: float, seed: int
) -> None:
    cluster = SimCluster(dict(zip(NAMES, ranks, strict=True)), loss=loss, seed=seed)
    for kind, argument in actions:
        if kind == "kill":
            assert isinstance(argument, str)
            cluster.kill(dev(argument))
        elif kind == "start" and isinstance(argument, str) and dev(argument) not in cluster.nodes:
            cluster.start(dev(argument))
        elif kind == "restart":
            assert isinstance(argument, str)
            cluster.start(dev(argument))  # a fresh daemon at once: its peers still think it alive
        elif kind == "partition":
            assert isinstance(argument, list)
            cluster.group = {dev(name): group for name, group in zip(NAMES, argument, strict=True)}
        elif kind == "heal":
            cluster.heal()
        elif kind == "run":
            assert isinstance(argument, float)
            cluster.run(argument)
    # Quiescence: whatever partition is left stays, messages stop being lost, time passes.
    cluster.loss = 0.0
    cluster.run(GRACE + DEAD_AFTER + 4 * HEARTBEAT + 2.0)
    for component in cluster.components():
        views = {cluster.nodes[device_id].election.current for device_id in component}
        assert len(views) == 1, f"component {sorted(component)} disagrees: {views}"
        (agreed,) = views
        assert agreed is not None
        assert agreed.coordinator_id in component
        coordinators = {d for d in component if cluster.nodes[d].election.role is Role.COORDINATOR}
        assert coordinators == {agreed.coordinator_id}
    for node in cluster.nodes.values():
        assert node.terms_seen == sorted(node.terms_seen), "a node's term went backwards"
