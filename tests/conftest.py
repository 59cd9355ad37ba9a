"""tests/, tests/workers, tools/ and examples/length_bias are on the import path through pytest's
``pythonpath`` setting (pyproject.toml); the shared helpers are tests/helpers.py, the persistent
pools of gloo ranks tests/pool.py (reported and stopped here when the session ends)."""


def pytest_terminal_summary(terminalreporter):
    from pool import pool_summary

    summary = pool_summary()
    if summary:
        terminalreporter.write_line(summary)


def pytest_unconfigure(config):  # after the terminal summary (pytest_sessionfinish comes before it)
    from pool import stop_pools

    stop_pools()
