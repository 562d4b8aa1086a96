"""The whole model against the official GLIP code's outputs (../shared/golden).

Every case folder and every golden_*.npz in it is checked: the model is built from
the official config.yaml + bert_config.json, the released-layout .pth is converted,
and every stored intermediate and the final detections are compared.
Tolerances: max |ours - official| < 1e-4 x max |official| per array; detections as
sets (sorted by score) with boxes within 0.01 px and scores within 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import golden_cases, golden_npz_files

from glipjax import convert
from glipjax.models.glip import GLIP, detect

RELATIVE_TOL = 1e-4
LEVELS = ("p3", "p4", "p5", "p6", "p7")


def test_golden_cases_exist(golden_dir):
    assert golden_dir.is_dir(), f"missing golden folder {golden_dir}"
    assert golden_cases(), f"no case with golden_*.npz under {golden_dir}"


def test_config_reads_the_alignment_text_and_the_conv_kind(tmp_path):
    """FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT picks the text the regions align with;
    DYHEAD.USE_DFCONV (absent: the reference's default, False) the head's conv kind."""
    import yaml

    for case in golden_cases():
        bert = case / "bert_config.json"
        bert = bert if bert.exists() else None
        head = convert.glip_config_from_official(case / "config.yaml", bert).head
        assert head.align_fused_text and head.deformable
        raw = yaml.safe_load((case / "config.yaml").read_text())
        raw["MODEL"]["DYHEAD"]["FUSE_CONFIG"]["USE_FUSED_FEATURES_DOT_PRODUCT"] = False
        del raw["MODEL"]["DYHEAD"]["USE_DFCONV"]
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
        head = convert.glip_config_from_official(tmp_path / "config.yaml", bert).head
        assert not head.align_fused_text and not head.deformable


@pytest.fixture(scope="module")
def models():
    """Per case: (config, params, jitted forward)."""
    built = {}
    for case in golden_cases():
        (checkpoint,) = case.glob("*.pth")
        bert = case / "bert_config.json"
        config, params = convert.load_official_glip(
            checkpoint, case / "config.yaml", bert if bert.exists() else None
        )
        model = GLIP(config)
        forward = jax.jit(lambda p, im, ids, mask, m=model: m.apply(
            {"params": p}, im, ids, mask, return_intermediates=True))
        built[case.name] = (config, params, forward)
    return built


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1))


def _close(name: str, ours, ref: np.ndarray) -> float:
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != official {ref.shape}"
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    assert err <= RELATIVE_TOL * max(scale, 1e-6), f"{name}: max diff {err:.3g} vs max |official| {scale:.3g}"
    return err / max(scale, 1e-6)


def pytest_generate_tests(metafunc):
    if "golden_file" in metafunc.fixturenames:
        files = golden_npz_files()
        metafunc.parametrize("golden_file", files, ids=[f"{f.parent.name}/{f.name}" for f in files])


def test_forward_and_detections_match_official(models, golden_file):
    g = dict(np.load(golden_file))
    config, params, forward = models[golden_file.parent.name]
    image = jnp.asarray(_nhwc(g["image"]))
    out = forward(params, image, jnp.asarray(g["input_ids"], jnp.int32), jnp.asarray(g["attention_mask"], jnp.int32))

    for i, stage in enumerate(("swin_stage3", "swin_stage4", "swin_stage5")):
        _close(stage, out["swin"][i], _nhwc(g[stage]))
    _close("lang_hidden", out["lang_hidden"], g["lang_hidden"])
    first = out["intermediates"][0]
    _close("head0_fusion_text", first["fusion_text"], g["head0_fusion_text"])
    _close("head0_bert_text", first["bert_text"], g["head0_bert_text"])
    anchors = config.anchors(*image.shape[1:3])
    for i, lv in enumerate(LEVELS):
        _close(f"fpn_{lv}", out["fpn"][i], _nhwc(g[f"fpn_{lv}"]))
        _close(f"head0_fusion_visual_{lv}", first["fusion_visual"][i], _nhwc(g[f"head0_fusion_visual_{lv}"]))
        _close(f"head0_dyconv_{lv}", first["dyconv"][i], _nhwc(g[f"head0_dyconv_{lv}"]))
        _close(f"bbox_reg_{lv}", out["bbox_reg"][i], _nhwc(g[f"bbox_reg_{lv}"]))
        _close(f"centerness_{lv}", out["centerness"][i], _nhwc(g[f"centerness_{lv}"]))
        _close(f"dot_product_logits_{lv}", out["dot_product_logits"][i], g[f"dot_product_logits_{lv}"])
        np.testing.assert_array_equal(anchors[i], g[f"anchors_{lv}"])

    positive_map = jnp.asarray(g["positive_map"])
    height, width = g["image"].shape[2:]
    dets = jax.jit(detect, static_argnums=(0, 5))(config, out, positive_map, jnp.ones(positive_map.shape[0], bool),
                                                  jnp.asarray([[height, width]]), (height, width))
    valid = np.asarray(dets.valid[0])
    scores = np.asarray(dets.scores[0])[valid]
    boxes = np.asarray(dets.boxes[0])[valid]
    labels = np.asarray(dets.labels[0])[valid]
    order, ref_order = np.argsort(-scores), np.argsort(-g["det_scores"])
    assert len(scores) == len(g["det_scores"]), f"{len(scores)} detections, official {len(g['det_scores'])}"
    np.testing.assert_array_equal(labels[order], g["det_labels"][ref_order])
    np.testing.assert_allclose(scores[order], g["det_scores"][ref_order], atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes[order], g["det_boxes"][ref_order], atol=0.01, rtol=0)
