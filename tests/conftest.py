# conftest is imported before any test module; importing bonsai_mlx here preloads OpenBLAS
# before anything imports mlx.core (see bonsai_mlx/_blas.py).
from pathlib import Path

import bonsai_mlx  # noqa: F401

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
