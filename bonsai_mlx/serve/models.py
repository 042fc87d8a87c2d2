"""`GET /v1/models`: the model being served, and the FLUX.2 [klein] models in the local
Hugging Face cache (read from disk only; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.layout import PIPELINE_CLASSES
from bonsai_mlx.weights import MODEL_ALIASES, read_json


def model_list(name: str, model_id: str, *, loaded: bool, created: int) -> list[dict]:
    served = {"id": name, "object": "model", "created": created, "owned_by": "bonsai-mlx",
              "served": True, "loaded": loaded}
    if name != model_id:
        served["source"] = model_id
    out = [served]
    aliases = {repo: alias for alias, repo in MODEL_ALIASES.items()}
    for repo_id, created_at in cached_models():
        if repo_id in (model_id, name):
            continue
        entry = {"id": repo_id, "object": "model", "created": created_at,
                 "owned_by": repo_id.split("/")[0], "served": False, "loaded": False}
        if repo_id in aliases:
            entry["alias"] = aliases[repo_id]
        out.append(entry)
    return out


def cached_models() -> list[tuple[str, int]]:
    """(repo id, last modified) of cached repos that hold a FLUX.2 [klein] pipeline."""
    from huggingface_hub import constants, scan_cache_dir

    try:
        cache = scan_cache_dir(str(constants.HF_HUB_CACHE))
    except Exception:  # no cache folder yet, or one we cannot read: nothing cached
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        if any(_is_klein(Path(rev.snapshot_path)) for rev in repo.revisions):
            found.append((repo.repo_id, int(repo.last_modified)))
    return sorted(found)


def _is_klein(snapshot: Path) -> bool:
    if (snapshot / "transformer-packed-mflux").is_dir():
        return True
    index = snapshot / "model_index.json"
    try:
        return index.is_file() and read_json(index).get("_class_name") in PIPELINE_CLASSES
    except BonsaiError:
        return False
