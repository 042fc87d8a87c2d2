"""The diffusers cases of scripts/fixtures/make_variants.py (inpainting, the 9B miniature,
reference KV caching, the small decoder), shared by their test modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = FIXTURES / "variants"
PIPELINES = FIXTURES / "pipeline"
CASES = json.loads((VARIANTS / "cases.json").read_text())
# The pipeline tolerance of tests/test_pipeline.py. Measured on these cases: 2e-6 .. 6e-6
# max abs (float32, CPU); a wrong mask, reference, decoder or cache moves them by >= 1e-3.
TOLERANCE = 2e-4


def arrays() -> np.lib.npyio.NpzFile:
    return np.load(VARIANTS / "cases.npz")


def image_path(name: str) -> Path:
    """An input image of the cases: ours, or make_pipeline.py's references."""
    return VARIANTS / name if (VARIANTS / name).exists() else PIPELINES / name


def generate_kwargs(case: str, data) -> dict:
    """Pipeline.generate's arguments for a case (prompt included, output_type "np")."""
    meta = CASES[case]
    k = meta["kwargs"]
    kwargs = dict(prompt=k["prompt"], steps=k["num_inference_steps"], output_type="np",
                  latents=data[f"{case}/{meta['random']}"])
    if "height" in k:
        kwargs.update(width=k["width"], height=k["height"])
    if "guidance_scale" in k:
        kwargs["guidance"] = k["guidance_scale"]
    if "num_images_per_prompt" in k:
        kwargs["num_images"] = k["num_images_per_prompt"]
    images = k.get("image")
    if images is not None:
        kwargs["images"] = [image_path(n) for n in ([images] if isinstance(images, str)
                                                    else images)]
    if "mask_image" in k:
        kwargs.update(mask=image_path(k["mask_image"]), strength=k["strength"])
    if "image_reference" in k:
        kwargs["images"].append(image_path(k["image_reference"]))
    return kwargs


def max_error(out: np.ndarray, case: str, data) -> float:
    ref = data[f"{case}/image"]
    assert out.shape == ref.shape and out.dtype == np.float32, (out.shape, ref.shape)
    return float(np.abs(out - ref).max())


def pipeline_folder(src: Path, dst: Path, **index) -> Path:
    """`src` with its model_index.json entries replaced by `index` (None removes one): a new
    folder whose components link to `src`'s."""
    dst.mkdir(parents=True)
    for child in src.iterdir():
        if child.name != "model_index.json":
            (dst / child.name).symlink_to(child.resolve(), target_is_directory=child.is_dir())
    entries = json.loads((src / "model_index.json").read_text())
    entries.update(index)
    entries = {k: v for k, v in entries.items() if v is not None}
    (dst / "model_index.json").write_text(json.dumps(entries))
    return dst
