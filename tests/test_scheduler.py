"""The scheduler is pure placement logic: plan() and replan() with fake
workers and refs."""

import random

import pytest

from qjamfab.core.scheduler import plan, replan

pytestmark = pytest.mark.timeout(20)


def refs_for(n):
    return [f"ref{i:04d}" for i in range(n)]


def workers_for(k):
    return [f"w{j}" for j in range(k)]


def check_plan(result, n, workers):
    """Every slice placed exactly once, on a known worker, sorted, no empty
    entries, and balanced to within one slice."""
    assert set(result) <= set(workers)
    placed = [i for slices in result.values() for i in slices]
    assert sorted(placed) == list(range(n)), "each slice exactly once"
    for slices in result.values():
        assert slices, "no empty entries"
        assert slices == sorted(slices)
    loads = [len(result.get(w, [])) for w in workers]
    assert max(loads) - min(loads) <= 1, f"unbalanced: {loads}"
    assert max(loads) == -(-n // len(workers))


# --- plan(): nothing held ---------------------------------------------------


@pytest.mark.parametrize("k", range(1, 9))
def test_plan_balanced_and_complete_without_held(k):
    workers = workers_for(k)
    for n in list(range(1, 40)) + [97, 100, 1000]:
        check_plan(plan(refs_for(n), workers, {}), n, workers)


def test_plan_fills_contiguous_blocks_in_worker_order():
    workers = workers_for(3)
    assert plan(refs_for(9), workers, {}) == {
        "w0": [0, 1, 2],
        "w1": [3, 4, 5],
        "w2": [6, 7, 8],
    }
    assert plan(refs_for(2), workers, {}) == {"w0": [0], "w1": [1]}
    for k in range(1, 9):
        workers = workers_for(k)
        for n in range(1, 50):
            result = plan(refs_for(n), workers, {})
            order = [i for w in workers for i in result.get(w, [])]
            assert order == list(range(n)), (n, k, result)
            for slices in result.values():
                assert slices == list(range(slices[0], slices[-1] + 1))


def test_plan_more_workers_than_slices():
    workers = workers_for(5)
    result = plan(refs_for(3), workers, {})
    check_plan(result, 3, workers)
    assert all(len(s) == 1 for s in result.values())


def test_plan_no_slices():
    assert plan([], workers_for(3), {}) == {}


def test_plan_one_worker_gets_everything():
    assert plan(refs_for(7), ["only"], {}) == {"only": list(range(7))}


def test_plan_without_workers_is_value_error():
    with pytest.raises(ValueError):
        plan(refs_for(3), [], {})


# --- plan(): determinism ----------------------------------------------------


def test_plan_is_deterministic():
    rng = random.Random(5)
    for _ in range(200):
        n, k = rng.randint(1, 60), rng.randint(1, 8)
        refs, workers = refs_for(n), workers_for(k)
        held = {w: set(rng.sample(refs, rng.randint(0, n))) for w in workers}
        first = plan(refs, workers, held)
        # fresh copies, and held given in another order: same answer
        held2 = {w: set(sorted(held[w], reverse=True)) for w in reversed(workers)}
        assert plan(list(refs), list(workers), held2) == first
        assert plan(refs, workers, held) == first


def test_new_master_lands_slices_where_the_old_one_did():
    """The first run places with nothing held; a new Master that learns
    what each worker holds (what the first run sent) lands every slice on
    the same worker, as does a second run of the same Master."""
    for k in range(1, 6):
        workers = workers_for(k)
        for n in (1, 5, 17, 64):
            refs = refs_for(n)
            first = plan(refs, workers, {})
            held = {w: {refs[i] for i in slices} for w, slices in first.items()}
            assert plan(refs, workers, held) == first
            assert plan(refs, workers, {}) == first


# --- plan(): held refs ------------------------------------------------------


def test_plan_honours_held():
    refs, workers = refs_for(6), workers_for(3)
    # without held, slice 0 goes to w0; w2 holds it, so it goes to w2
    result = plan(refs, workers, {"w2": {refs[0]}})
    assert 0 in result["w2"]
    check_plan(result, 6, workers)


def test_plan_held_slices_stay_with_holders_after_shuffle():
    refs, workers = refs_for(8), workers_for(2)
    held = {
        "w0": {refs[i] for i in (1, 3, 5, 7)},
        "w1": {refs[i] for i in (0, 2, 4, 6)},
    }
    assert plan(refs, workers, held) == {"w0": [1, 3, 5, 7], "w1": [0, 2, 4, 6]}


def test_plan_holder_gets_slices_only_while_it_has_room():
    refs, workers = refs_for(6), workers_for(3)
    held = {"w1": set(refs)}  # w1 holds everything; capacity is 2
    result = plan(refs, workers, held)
    check_plan(result, 6, workers)
    assert len(result["w1"]) == 2
    assert result["w1"] == [0, 1]  # the first ones it holds


def test_plan_ref_held_by_several_goes_to_least_loaded_holder():
    refs, workers = refs_for(4), workers_for(2)
    held = {"w0": set(refs), "w1": set(refs)}
    result = plan(refs, workers, held)
    check_plan(result, 4, workers)


def test_plan_ignores_held_for_unknown_workers_and_unknown_refs():
    refs, workers = refs_for(6), workers_for(2)
    held = {"gone": set(refs), "w0": {"not-a-ref"}}
    assert plan(refs, workers, held) == plan(refs, workers, {})


def test_plan_duplicate_refs_are_still_separate_slices():
    refs = ["same"] * 6
    workers = workers_for(3)
    result = plan(refs, workers, {"w0": {"same"}})
    check_plan(result, 6, workers)


def test_plan_held_never_exceeds_capacity_random():
    """Property: whatever is held, every slice is placed exactly once and no
    worker gets more than ceil(n / workers) slices."""
    rng = random.Random(7)
    for _ in range(500):
        n, k = rng.randint(1, 40), rng.randint(1, 6)
        refs, workers = refs_for(n), workers_for(k)
        held = {
            w: set(rng.sample(refs, rng.randint(0, n)))
            for w in workers
            if rng.random() < 0.7
        }
        result = plan(refs, workers, held)
        placed = sorted(i for s in result.values() for i in s)
        assert placed == list(range(n))
        assert max(len(s) for s in result.values()) == -(-n // k)
        owner = {i: w for w, s in result.items() for i in s}
        for i, ref in enumerate(refs):
            holders = [w for w in workers if ref in held.get(w, ())]
            if holders and owner[i] not in holders:
                # a held slice lands elsewhere only when its holders have
                # their share already
                assert all(len(result.get(w, [])) >= n // k for w in holders), (
                    n,
                    k,
                    held,
                    result,
                )


def test_plan_held_keeps_balance_random():
    """Property: whatever is held, every slice is placed once and the loads
    differ by at most one."""
    rng = random.Random(11)
    for _ in range(500):
        n, k = rng.randint(1, 40), rng.randint(1, 6)
        refs, workers = refs_for(n), workers_for(k)
        held = {
            w: set(rng.sample(refs, rng.randint(0, n)))
            for w in workers
            if rng.random() < 0.7
        }
        result = plan(refs, workers, held)
        try:
            check_plan(result, n, workers)
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n n={n} workers={workers} held={held}\n plan={result}"
            ) from None


def test_plan_held_keeps_balance_when_holders_fill_up():
    """4 slices on 3 workers: at most one worker may take 2 slices. Each
    of w0 and w1 holds two slices (say, from an earlier run on 2 workers),
    yet the plan must stay balanced to within one slice."""
    refs, workers = refs_for(4), workers_for(3)
    held = {"w0": {refs[0], refs[1]}, "w1": {refs[2], refs[3]}}
    result = plan(refs, workers, held)
    check_plan(result, 4, workers)


# --- replan() ---------------------------------------------------------------


def test_replan_prefers_a_surviving_holder():
    refs = refs_for(6)
    held = {"w0": {refs[4]}, "w2": {refs[5]}, "dead": set(refs)}
    placed = replan([4, 5], refs, ["w0", "w1", "w2"], held, {"w0": 5, "w1": 0, "w2": 9})
    assert placed == [("w0", 4), ("w2", 5)]


def test_replan_holder_least_busy_among_holders():
    refs = refs_for(3)
    held = {"w0": {refs[1]}, "w1": {refs[1]}, "w2": {refs[1]}}
    placed = replan([1], refs, ["w0", "w1", "w2"], held, {"w0": 3, "w1": 1, "w2": 2})
    assert placed == [("w1", 1)]


def test_replan_without_holder_goes_to_least_busy():
    refs = refs_for(4)
    placed = replan(
        [2], refs, ["w0", "w1", "w2"], {"dead": {refs[2]}}, {"w0": 2, "w1": 1, "w2": 3}
    )
    assert placed == [("w1", 2)]


def test_replan_spreads_several_slices_across_survivors():
    refs = refs_for(12)
    survivors = workers_for(3)
    placed = replan(list(range(6)), refs, survivors, {}, {})
    assert [i for _, i in placed] == list(range(6))
    counts = {w: sum(1 for x, _ in placed if x == w) for w in survivors}
    assert counts == {"w0": 2, "w1": 2, "w2": 2}


def test_replan_spreads_taking_existing_busy_into_account():
    survivors = workers_for(3)
    placed = replan(
        [0, 1, 2, 3], refs_for(4), survivors, {}, {"w0": 2, "w1": 0, "w2": 1}
    )
    final = {"w0": 2, "w1": 0, "w2": 1}
    for w, _ in placed:
        final[w] += 1
    assert max(final.values()) - min(final.values()) <= 1
    assert placed[0] == ("w1", 0)


def test_replan_busy_of_unknown_or_missing_workers():
    # a busy count for a dead worker is ignored; missing ones count as 0
    placed = replan([0], refs_for(1), ["w0", "w1"], {}, {"dead": 0, "w0": 1})
    assert placed == [("w1", 0)]


def test_replan_refs_none():
    placed = replan([0, 1, 2], None, ["a", "b"], {"a": {"x"}}, {"a": 1})
    assert sorted(i for _, i in placed) == [0, 1, 2]
    assert placed[0] == ("b", 0)
    assert {w for w, _ in placed} == {"a", "b"}


def test_replan_empty_slices():
    assert replan([], refs_for(3), ["w0"], {}, {}) == []


def test_replan_is_deterministic_and_does_not_mutate_busy():
    refs = refs_for(10)
    held = {"w1": {refs[3], refs[7]}}
    busy = {"w0": 1, "w1": 1, "w2": 0}
    first = replan([3, 5, 7, 9], refs, ["w0", "w1", "w2"], held, busy)
    assert busy == {"w0": 1, "w1": 1, "w2": 0}
    assert replan([3, 5, 7, 9], refs, ["w0", "w1", "w2"], held, busy) == first
    assert ("w1", 3) in first and ("w1", 7) in first


def test_replan_each_slice_is_its_own_entry():
    placed = replan([7, 3, 5], refs_for(8), ["w0"], {}, {})
    assert placed == [("w0", 7), ("w0", 3), ("w0", 5)]


def test_replan_without_survivors_is_value_error():
    with pytest.raises(ValueError):
        replan([0], refs_for(1), [], {}, {})
