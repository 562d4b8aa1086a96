"""Export: python -m glipjax.export --checkpoint DIR --out DIR [--dtype bfloat16] [--ema]
                 [--step N] [--height H --width W] [--batch B] [--phrases P]

Turns a training workdir (or another export) into an inference bundle:

  <out>/config.json                the run config; data.canvas is the exported canvas and
                                   model.dtype the --dtype
  <out>/text_encoder/config.json   the text encoder's sizes (if the config names one), so the
                                   bundle loads without the encoder's folder
  <out>/params/                    params-only Orbax checkpoint, floating params in --dtype
  <out>/inference_<H>x<W>_L<L>.jax  jax.export of the jitted
        forward(params, images (B, H, W, 3) float32, input_ids (B, L) int32,
                attention_mask (B, L) int32, positive_map (P, L) float32,
                phrase_mask (P,) bool, image_sizes (B, 2) int32)
          -> (boxes (B, D, 4), scores (B, D), labels (B, D) int32 phrase index + 1, valid (B, D) bool)
        for this backend, B = --batch, canvas H x W (default data.canvas), L the text
        length, P = --phrases (default: the most classes a class prompt of L tokens
        holds) and D the model's max detections
  <out>/export.json                source step, EMA, dtype and the function's shapes

glipjax.runs.load_run and python -m glipjax.predict read the bundle; predict runs the
serialized function (jax.export.deserialize(...).call) when its shapes fit. No
TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from glipjax import checkpoint, pretrained, runs, sharding
from glipjax.inference import max_phrases
from glipjax.models.glip import GLIP, SIZE_DIVISIBILITY, detect

DTYPES = ("float32", "bfloat16", "float16")


def cast_params(params: Any, dtype: str) -> Any:
    """Floating params cast to `dtype`; integer leaves unchanged."""
    target = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def inference_inputs(batch: int, height: int, width: int, text_len: int, phrases: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The serialized function's inputs after params, in call order."""
    return {
        "images": jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((batch, text_len), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((batch, text_len), jnp.int32),
        "positive_map": jax.ShapeDtypeStruct((phrases, text_len), jnp.float32),
        "phrase_mask": jax.ShapeDtypeStruct((phrases,), jnp.bool_),
        "image_sizes": jax.ShapeDtypeStruct((batch, 2), jnp.int32),
    }


def export_inference(model: GLIP, params: Any, inputs: dict[str, jax.ShapeDtypeStruct]) -> jax.export.Exported:
    """jax.export of forward(params, *inputs) -> (boxes, scores, labels, valid)."""
    config = model.config

    def forward(params, images, input_ids, attention_mask, positive_map, phrase_mask, image_sizes):
        outputs = model.apply({"params": params}, images, input_ids, attention_mask)
        return tuple(detect(config, outputs, positive_map, phrase_mask, image_sizes, images.shape[1:3]))

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return jax.export.export(jax.jit(forward))(abstract, *inputs.values())


def _describe(structs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in structs.items()]


def export(checkpoint_dir: str | pathlib.Path, out: str | pathlib.Path, *, dtype: str | None = None,
           ema: bool = False, step: int | None = None, height: int | None = None, width: int | None = None,
           batch: int = 1, phrases: int | None = None) -> dict[str, Any]:
    """Writes the bundle described in the module docstring; returns export.json's content."""
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise runs.RunError(f"{out} exists and is not an empty directory; choose a new --out")
    if dtype is not None and dtype not in DTYPES:
        raise runs.RunError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    run = runs.load_run(checkpoint_dir, ema=ema, step=step,
                        mesh=sharding.make_mesh({"data": 1}, jax.local_devices()[:1]))
    config = run.config.copy_and_resolve_references()
    height, width = height or config.data.canvas[0], width or config.data.canvas[1]
    if height % SIZE_DIVISIBILITY or width % SIZE_DIVISIBILITY or height < 1 or width < 1:
        raise runs.RunError(f"the canvas {height}x{width} must be positive multiples of {SIZE_DIVISIBILITY}")
    text_len = run.glip_config.max_text_len
    phrases = phrases or max_phrases(text_len)
    if batch < 1 or phrases < 1:
        raise runs.RunError(f"--batch and --phrases must be at least 1, got {batch} and {phrases}")
    dtype = dtype or config.model.dtype
    params = cast_params(run.params, dtype)
    model = GLIP(run.glip_config, dtype=jnp.dtype(dtype))
    inputs = inference_inputs(batch, height, width, text_len, phrases)
    exported = export_inference(model, params, inputs)

    out.mkdir(parents=True, exist_ok=True)
    if config.model.text_encoder:
        source = pathlib.Path(checkpoint_dir) / runs.TEXT_ENCODER_DIR  # re-exporting an export
        if not source.is_dir():
            source = pretrained.resolve_text_encoder(config.model.text_encoder)
        (out / runs.TEXT_ENCODER_DIR).mkdir()
        shutil.copy(source / "config.json", out / runs.TEXT_ENCODER_DIR)
    config.data.canvas = (height, width)
    config.model.dtype = dtype
    (out / runs.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    checkpoint.export_params(params, out / runs.PARAMS_DIR)
    name = f"inference_{height}x{width}_L{text_len}.jax"
    (out / name).write_bytes(exported.serialize())
    outputs = dict(zip(("boxes", "scores", "labels", "valid"), exported.out_avals))
    info = {
        "step": run.step, "ema": ema, "dtype": dtype, "source": str(checkpoint_dir),
        "inference": {"file": name, "batch": batch, "height": height, "width": width, "text_len": text_len,
                      "phrases": phrases, "platforms": list(exported.platforms),
                      "inputs": _describe(inputs), "outputs": _describe(outputs)},
    }
    (out / runs.EXPORT_FILE).write_text(json.dumps(info, indent=2))  # written last: the bundle is complete
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training workdir (or an export)")
    parser.add_argument("--out", required=True, help="a new or empty directory for the bundle")
    parser.add_argument("--dtype", choices=DTYPES, help="params and compute dtype (default: the config's)")
    parser.add_argument("--ema", action="store_true", help="export the EMA params of a training workdir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--height", type=int, help="canvas height of the serialized function (default: data.canvas)")
    parser.add_argument("--width", type=int, help="canvas width of the serialized function (default: data.canvas)")
    parser.add_argument("--batch", type=int, default=1, help="images per call of the serialized function")
    parser.add_argument("--phrases", type=int, help="phrase slots per call (default: the most a prompt can hold)")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on metadata it does not need
    try:
        info = export(args.checkpoint, args.out, dtype=args.dtype, ema=args.ema, step=args.step, height=args.height,
                      width=args.width, batch=args.batch, phrases=args.phrases)
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    shapes = info["inference"]
    print(f"exported step {info['step']} ({info['dtype']}) to {args.out}: {shapes['file']} for "
          f"{shapes['batch']} image(s) of {shapes['height']}x{shapes['width']}, {shapes['text_len']} tokens, "
          f"{shapes['phrases']} phrases, platforms {shapes['platforms']}")


if __name__ == "__main__":
    main()
