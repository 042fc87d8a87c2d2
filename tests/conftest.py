import bonsai_mlx  # noqa: F401  (first: preloads OpenBLAS before mlx.core on Linux)
import pytest
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
