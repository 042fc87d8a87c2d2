"""`bonsai-mlx serve`: a local studio in the browser and an OpenAI-compatible Images API.

`command.serve` is the click command (found by the CLI's lazy loader); `app.create_app`
builds the ASGI app around a `jobs.Worker` that owns the pipeline.
"""

from bonsai_mlx.serve.command import serve

__all__ = ["serve"]
