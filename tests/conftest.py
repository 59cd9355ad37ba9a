"""tests/, tests/workers, tools/ and examples/length_bias are on the import path through pytest's
``pythonpath`` setting (pyproject.toml); the shared helpers are tests/helpers.py, the persistent
pools of gloo ranks tests/pool.py (stopped here when the session ends)."""


def pytest_sessionfinish(session, exitstatus):
    from pool import stop_pools

    stop_pools()
