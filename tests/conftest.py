"""tests/, tests/workers, tools/ and examples/length_bias are on the import path through pytest's
``pythonpath`` setting (pyproject.toml); the shared helpers are tests/helpers.py, the persistent
pools of gloo ranks tests/pool.py (reported and stopped here when the session ends).

Under pytest-xdist (``make test``: two workers) each worker has pools of its own; a worker sends its
pools' line to the controller, which prints one line per worker."""

import pytest

_WORKER_LINES: list[str] = []


@pytest.fixture(scope="session")
def tp2_six_steps(tmp_path_factory):
    """One run several tests read (copy it before changing it): TP 2, 6 steps, checkpoints at 3 and
    6; its metrics and its directory (``ckpt/``, ``metrics.jsonl``)."""
    from helpers import train

    tmp = tmp_path_factory.mktemp("shared")
    metrics, _ = train(tmp, "tp2_six_steps", 2, "--tensor-model-parallel-size", "2", "--train-iters", "6",
                       "--save-interval", "3", save=True)  # fmt: skip
    return metrics, tmp / "tp2_six_steps"


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker
        from pool import pool_summary

        workeroutput["pool_summary"] = pool_summary()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: the controller, as a worker ends
def pytest_testnodedown(node, error):
    line = getattr(node, "workeroutput", {}).get("pool_summary")
    if line:
        _WORKER_LINES.append(f"{node.gateway.id}: {line}")


def pytest_terminal_summary(terminalreporter):
    from pool import pool_summary

    for line in [*sorted(_WORKER_LINES), pool_summary()]:
        if line:
            terminalreporter.write_line(line)


def pytest_unconfigure(config):  # after the terminal summary (pytest_sessionfinish comes before it)
    from pool import stop_pools

    stop_pools()
