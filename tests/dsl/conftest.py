"""Options for the language tests: `pytest tests/dsl --update-golden` rewrites the golden ASTs."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/dsl/golden/*.json from the current parser (review the diff)")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")
