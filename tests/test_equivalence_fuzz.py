"""CI's handful of the differential fuzzer's configs (tests/equivalence_fuzz.py): each trains on its
ranks and on one device, and must agree to 1e-5. The seeds were picked from the long run to cover
what broke before (expert replicas under ZeRO-2 with `auto` flipping kernels: seeds 13, 22, 48) and what is easy to
get wrong: experts without tokens, capacity drops, a world size of 3, small ZeRO buckets,
overlap_comm, activation checkpointing, every forced kernel and dense ZeRO-3."""
from __future__ import annotations

import pytest

import equivalence_fuzz as fuzz

# 13, 22 and 48 train on wrong gradients without grad_order.py (measured: docs/benchmarks.md).
SEEDS = [13, 22, 48, 9, 8, 10, 1, 7]
EMPTY_EXPERTS = {9, 8}  # some expert gets no token in a whole step (checked from the run's routing statistics)
COVERED = {"replicas-zero0", "replicas-zero1", "replicas-zero2", "expert-parallel", "drops", "world-3",
           "small-buckets", "overlap-comm", "activation-checkpointing", "kernel-auto", "kernel-auto-flip",
           "kernel-grouped_mm", "kernel-bmm", "kernel-loop", "dense-zero3"}


def test_the_seeds_cover_what_ci_must_check():
    found = set().union(*(fuzz.features(fuzz.draw(seed)) for seed in SEEDS))
    assert COVERED <= found, sorted(COVERED - found)


def test_draw_is_a_pure_function_of_the_seed():
    assert fuzz.draw(123) == fuzz.draw(123)
    assert len({str(fuzz.draw(seed)) for seed in range(50)}) == 50
    for seed in range(200):
        case = fuzz.draw(seed)
        args = case["args"]
        assert 2 <= case["world"] <= 4
        if args["use_moe"]:
            assert case["world"] % args["ep_size"] == 0 and args["num_experts"] % args["ep_size"] == 0
            assert 2 <= args["num_experts"] <= 16 and 1 <= args["num_experts_per_tok"] <= min(4, args["num_experts"])
        else:
            assert case["stage"] in (0, 1, 2, 3)
        assert args["gradient_accumulation_steps"] % case["world"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_ranks_match_one_device(char_data, tmp_path, seed, forkserver):
    case = fuzz.draw(seed)
    notes = []  # isolated fp32 rounding through Adam (equivalence_fuzz.compare) is explained, not a failure
    problems = fuzz.run(case, char_data, tmp_path, timeout=240, notes=notes, launch_ranks=forkserver.run_ranks)
    print(*notes, sep="\n")
    assert not problems, (f"seed {seed} ({case}):\n" + "\n".join(problems) +
                          f"\nreproduce: python tests/equivalence_fuzz.py --data_dir DIR --seed {seed}")
    assert fuzz.empty_experts(tmp_path / "one") == (seed in EMPTY_EXPERTS)
