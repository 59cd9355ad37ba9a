"""The persistent pool of gloo ranks the multi-rank tests run on (tests/pool.py), and the re-entrant
trainer it relies on: a failure fails its own job only (with the ranks' output) and the next job
runs on clean ranks; a job that leaves state behind is caught; runs back to back in one process
equal separate launches bitwise."""

from __future__ import annotations

import pytest

from helpers import BASE, LAUNCH, read_metrics, run_torchrun
from pool import PoolJobError, RankPool, pool

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def own_pool():
    """A pool of its own (these tests break it on purpose; the session's pools stay untouched)."""
    p = RankPool(2, warm=False)  # torch and gloo only: a restart costs a second or two
    yield p
    p.stop()


def test_a_job_runs_on_every_rank_and_returns_in_rank_order(own_pool):
    results, _ = own_pool.run("pool_jobs:rank_and_sum", 5)
    assert results == [(0, 10), (1, 10)]


def fails_then_the_next_job_runs(own_pool, target: str, *args, **kwargs) -> str:
    """Run ``target``, which must fail; the next job runs, on ranks started once more. The failure's text."""
    own_pool.run("pool_jobs:rank_and_sum", 0)  # started and healthy before the failure
    starts = own_pool.starts
    with pytest.raises(PoolJobError) as failure:
        own_pool.run(target, *args, **kwargs)
    assert own_pool.run("pool_jobs:rank_and_sum", 3)[0] == [(0, 6), (1, 6)]
    assert own_pool.starts == starts + 1  # restarted for the next job
    return str(failure.value)


def test_an_exception_comes_back_with_the_failing_ranks_traceback(own_pool):
    text = fails_then_the_next_job_runs(own_pool, "pool_jobs:fail_on", 1)
    assert "failed on rank(s) [1]" in text and "--- rank 1 ---" in text and "--- rank 0 ---" not in text
    assert "ValueError: planted failure on rank 1" in text and "pool_jobs.py" in text  # the traceback
    assert "rank 0 was here" in text and "rank 1 was here" in text  # the ranks' output


def test_a_job_that_hangs_fails_its_own_test_and_the_next_job_runs(own_pool):
    text = fails_then_the_next_job_runs(own_pool, "pool_jobs:hang", 600, timeout=3)
    assert "ran past its timeout of 3 s" in text and "about to hang" in text
    assert "rank 0: running (killed by the pool)" in text


def test_a_job_that_kills_a_rank_fails_its_own_test_and_the_next_job_runs(own_pool):
    text = fails_then_the_next_job_runs(own_pool, "pool_jobs:kill_rank", 1, timeout=60)
    assert "rank 1 died" in text and "rank 1: killed by SIGKILL" in text and "rank 1 before the kill" in text


@pytest.mark.parametrize(
    "job, leftover",
    [
        ("leave_a_signal_handler", "the SIGTERM handler changed"),
        ("leave_model_parallel_state", "megatron-core's model-parallel state is still initialised"),
    ],
)
def test_a_job_that_leaves_state_behind_fails_and_the_pool_restarts(own_pool, job, leftover):
    text = fails_then_the_next_job_runs(own_pool, f"pool_jobs:{job}")
    assert "left state behind" in text and leftover in text


LAYOUTS = [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    ["--tensor-model-parallel-size", "1", "--use-distributed-optimizer"],
]  # fmt: skip


# What a clock or the process's memory measures, not the run.
CLOCK_KEYS = ("time", "pairs_per_s", "tokens_per_s", "step_time_s", "peak_memory_gib")


def test_three_layouts_back_to_back_in_one_process_equal_three_launches(tmp_path):
    """The trainer is re-entrant: TP 2 + SP, an interleaved PP 2 and DP 2 with the distributed
    optimizer, run one after the other in the same two processes, give bitwise the metrics of
    three separate torchrun launches (and nothing is left behind: the pool checks after the job)."""

    def argv(where: str, i: int) -> list[str]:
        run = tmp_path / where / str(i)
        return [*BASE, *LAYOUTS[i], "--save", str(run / "ckpt"), "--metrics-file", str(run / "metrics.jsonl")]

    codes, out = pool(2).run("pool_jobs:train_layouts", [argv("pooled", i) for i in range(3)])
    assert codes == [[0, 0, 0], [0, 0, 0]], out[-3000:]
    for i in range(3):
        run_torchrun(LAUNCH, 2, *argv("launched", i), launch=True)
        pooled = read_metrics(tmp_path / "pooled" / str(i) / "metrics.jsonl")
        launched = read_metrics(tmp_path / "launched" / str(i) / "metrics.jsonl")
        assert len(pooled) == 3
        keys = [k for k in launched[0] if k not in CLOCK_KEYS and not k.startswith("time/")]
        assert [{k: m[k] for k in keys} for m in pooled] == [{k: m[k] for k in keys} for m in launched], LAYOUTS[i]
