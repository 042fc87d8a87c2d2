# conftest is imported before any test module; importing bonsai_mlx here preloads OpenBLAS
# before anything imports mlx.core (see bonsai_mlx/_blas.py).
from pathlib import Path

import bonsai_mlx  # noqa: F401

import mlx.core as mx
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def pytest_collection_modifyitems(config, items):
    """Tests marked `metal` need a real Apple GPU. They are always collected, and shown as
    skipped elsewhere, so a summary never hides that real-hardware coverage is missing."""
    if mx.metal.is_available():
        return
    skip = pytest.mark.skip(reason="no Apple GPU")
    for item in items:
        if item.get_closest_marker("metal") is not None:
            item.add_marker(skip)
