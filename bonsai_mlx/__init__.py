"""bonsai-mlx: FLUX.2 [klein] 4B and its 1-bit / ternary compressions on MLX."""

from bonsai_mlx._blas import preload_openblas
from bonsai_mlx._malloc import keep_freed_memory

preload_openblas()  # before anything imports mlx.core
keep_freed_memory()  # MLX's CPU arrays reuse freed memory instead of faulting in new pages

from bonsai_mlx.errors import BonsaiError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BonsaiError", "Pipeline", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import bonsai_mlx` stays cheap and the pipeline's heavy imports
    # happen only when it is used.
    if name == "Pipeline":
        from bonsai_mlx.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'bonsai_mlx' has no attribute {name!r}")
