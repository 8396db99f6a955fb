"""Options for the language tests: `pytest tests/dsl --update-golden` rewrites the golden ASTs.

(pytest only registers options from the conftest files it loads at start-up, so name tests/dsl on
the command line; if a suite-wide conftest registers `--update-golden` too, that one is used.)
"""

import pytest


def pytest_addoption(parser):
    try:
        parser.addoption("--update-golden", action="store_true", default=False,
                         help="rewrite golden files from the current code (review the diff)")
    except ValueError:  # already registered by another conftest
        pass


@pytest.fixture
def update_golden(request) -> bool:
    return bool(request.config.getoption("--update-golden", default=False))
