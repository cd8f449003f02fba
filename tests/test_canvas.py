"""Canvas data (real MNIST digits + scikit-image photographs) and the canvas ViT's checkpoint plumbing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from arrcoc.backbones import adapt_backbone
from arrcoc.data import (
    COLORS,
    POSITIONS,
    CanvasConfig,
    QueryConfig,
    canvas_sources,
    cluttered_split,
    digit_hashes,
    query_phrasings,
    query_split,
)
from arrcoc.models.canvas_vit import CanvasViTConfig, build_canvas_vit, load_canvas_vit, save_canvas_vit

torch.set_num_threads(1)
TINY = CanvasViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def sources():
    return canvas_sources()


@pytest.fixture(scope="module")
def train(sources):
    return cluttered_split("train", 64, seed=3, sources=sources)


@pytest.fixture(scope="module")
def query(sources):
    return query_split("train", 64, seed=3, sources=sources)


def test_no_source_digit_in_both_train_and_test(sources):
    train_hashes, test_hashes = digit_hashes(sources.x_train), digit_hashes(sources.x_test)
    assert len(train_hashes) > 3900 and len(test_hashes) > 900
    assert not train_hashes & test_hashes


def test_split_canvases_draw_only_from_their_split(sources):
    test = cluttered_split("test", 32, seed=0, sources=sources)
    assert int(test.source_index.max()) < len(sources.x_test)
    assert torch.equal(test.labels, sources.y_test[test.source_index])


def test_cluttered_canvases_are_deterministic_per_seed(sources, train):
    again = cluttered_split("train", 64, seed=3, sources=sources)
    other = cluttered_split("train", 64, seed=4, sources=sources)
    assert torch.equal(train.images, again.images) and torch.equal(train.boxes, again.boxes)
    assert not torch.equal(train.images, other.images)


def test_cluttered_shapes_and_ranges(train):
    assert train.images.shape == (64, 3, 64, 64) and train.images.dtype == torch.float32
    assert 0 <= float(train.images.min()) and float(train.images.max()) <= 1
    assert train.labels.shape == (64,) and set(train.labels.tolist()) <= set(range(10))
    x0, y0, x1, y1 = train.boxes.unbind(1)
    assert bool(((x0 >= 0) & (y0 >= 0) & (x1 <= 64) & (y1 <= 64) & (x1 > x0 + 2) & (y1 > y0 + 4)).all())


def _box_crop(images, boxes, size=20):
    """Each box's region resampled to size x size, summed over colour channels."""
    crops = []
    for image, (x0, y0, x1, y1) in zip(images, boxes.round().long().tolist()):
        region = image[:, y0:y1, x0:x1].sum(0, keepdim=True)[None]
        crops.append(F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(crops)


def _ink_crop(digits, size=20):
    """Each source digit cropped to its own ink box and resampled like ``_box_crop``."""
    squares = digits.view(-1, 28, 28)
    crops = []
    for square in squares:
        rows, cols = (square > 0.2).any(1).nonzero()[:, 0], (square > 0.2).any(0).nonzero()[:, 0]
        region = square[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1][None, None]
        crops.append(F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(crops)


def _correlation(a, b):
    a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


def test_target_digit_is_in_its_box(sources, train):
    seen = _box_crop(train.images, train.boxes)
    source = _ink_crop(sources.x_train[train.source_index])
    matched = _correlation(seen, source)
    shuffled = _correlation(seen, source.roll(1, dims=0))
    assert float(matched.median()) > 0.7
    assert float(matched.mean()) > float(shuffled.mean()) + 0.2


def test_query_canvases(query):
    assert query.images.shape == (64, 3, 64, 64) and len(query.queries) == 64
    assert bool((query.present.sum(1) >= 3).all())
    rows = torch.arange(64)
    assert bool(query.present[rows, query.target_slot].all())
    assert torch.equal(query.labels, query.slot_labels[rows, query.target_slot])
    for i, (sentence, kind) in enumerate(zip(query.queries, query.query_kind)):
        slot = int(query.target_slot[i])
        if kind == "color":
            assert list(COLORS)[int(query.slot_colors[i, slot])] in sentence
        else:
            assert POSITIONS[slot] in sentence
    # occupied slots have distinct colours
    for colors, present in zip(query.slot_colors, query.present):
        assert len(set(colors[present].tolist())) == int(present.sum())


def test_queried_digit_has_its_colour(query):
    """The brightest pixels inside the queried box carry the queried colour."""
    palette = torch.tensor(list(COLORS.values()))
    rows = torch.arange(64)
    hits = 0
    for i, (x0, y0, x1, y1) in enumerate(query.boxes.round().long().tolist()):
        region = query.images[i, :, y0:y1, x0:x1].flatten(1)
        ink = region[:, region.sum(0) > region.sum(0).quantile(0.9)].mean(1)
        hits += int(torch.cdist(ink[None], palette).argmin()) == int(query.slot_colors[rows[i], query.target_slot[i]])
    assert hits >= 60


def test_held_out_phrasings_never_in_training(sources):
    for kind in ("color", "position"):
        assert not set(query_phrasings(kind, True)) & set(query_phrasings(kind, False))
    train = query_split("train", 200, seed=0, sources=sources)
    test = query_split("test", 200, seed=0, sources=sources)
    train_templates = {t.format(c=c, p=p) for k in ("color", "position") for t in query_phrasings(k, False)
                       for c in COLORS for p in POSITIONS}
    assert set(train.queries) <= train_templates
    assert not set(test.queries) & train_templates


def clutter_ink(batch) -> float:
    """Share of bright pixels outside the target's box: the clutter."""
    centres = torch.arange(batch.images.shape[-1]).float() + 0.5
    b = batch.boxes[:, :, None]
    inside = (((centres >= b[:, 0]) & (centres < b[:, 2]))[:, None, :]
              & ((centres >= b[:, 1]) & (centres < b[:, 3]))[:, :, None])
    bright = batch.images.amax(1) > 0.6
    return (bright & ~inside).float().mean().item()


def test_shift_split_statistics_differ(sources, train):
    shift = cluttered_split("shift", 64, seed=3, sources=sources)
    assert clutter_ink(shift) > 2 * clutter_ink(train)  # 3x the fragments
    box_height = lambda b: (b[:, 3] - b[:, 1]).mean()  # noqa: E731
    assert box_height(shift.boxes) > box_height(train.boxes) + 1  # larger digits
    query_train = query_split("train", 64, seed=3, sources=sources)
    query_shift = query_split("shift", 64, seed=3, sources=sources)
    assert query_shift.images.mean() > query_train.images.mean() + 0.03


def test_configs_change_canvases(sources):
    plain = cluttered_split("train", 8, seed=0, sources=sources, config=CanvasConfig(num_fragments=(0, 0)))
    busy = cluttered_split("train", 8, seed=0, sources=sources, config=CanvasConfig(num_fragments=(8, 8)))
    assert busy.images.mean() > plain.images.mean()
    with pytest.raises(ValueError, match="split"):
        cluttered_split("valid", 4, sources=sources)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct colours"):
        query_split("train", 4, sources=sources, config=QueryConfig(colors=("red", "green")))


def test_the_held_out_layout_puts_digits_anywhere_some_beside_another_and_asks_by_a_unique_colour(sources):
    """The ``anywhere`` split (issue 36's held-out regime for grouping): 2-5 digits that overlap little, about half
    placed beside an earlier one, the queried one the only one of its colour, asked with held-out phrasings."""
    canvases = query_split("anywhere", 200, seed=5, sources=sources)
    count = canvases.present.sum(1)
    assert int(count.min()) >= 2 and int(count.max()) == 5 and canvases.present.shape[1] == 5
    rows = torch.arange(200)
    assert bool(canvases.present[rows, canvases.target_slot].all())
    assert torch.equal(canvases.labels, canvases.slot_labels[rows, canvases.target_slot])
    assert set(canvases.query_kind) == {"color"}
    assert set(canvases.queries) <= {t.format(c=c) for t in query_phrasings("color", True) for c in COLORS}
    beside = 0
    for i in range(200):
        queried = int(canvases.slot_colors[i, canvases.target_slot[i]])
        assert list(COLORS)[queried] in canvases.queries[i]
        assert int((canvases.slot_colors[i] == queried).sum()) == 1  # the only digit of that colour
        boxes = canvases.all_boxes[i][canvases.present[i]]
        # ink boxes sit inside their squares: two of them apart by less than 4 px are neighbours
        gaps = torch.maximum(boxes[:, None, :2] - boxes[None, :, 2:], boxes[None, :, :2] - boxes[:, None, 2:]).amax(-1)
        beside += int(bool((gaps.fill_diagonal_(1e9) < 4).any()))
    assert beside >= 80  # half the digits after the first are placed beside another
    again = query_split("anywhere", 200, seed=5, sources=sources)
    assert torch.equal(again.images, canvases.images) and again.queries == canvases.queries
    with pytest.raises(ValueError, match="a layout of the query canvases"):
        cluttered_split("anywhere", 4, sources=sources)
    with pytest.raises(ValueError, match="query layout must be one of"):
        QueryConfig(layout="scattered")


def test_conv_stem_vit_works_with_adapter_keep_all_exact():
    model = build_canvas_vit(TINY).eval()
    images = torch.rand(3, 3, 64, 64)
    adapter = adapt_backbone(model)
    assert adapter.grid(images).num_patches == 64
    with torch.no_grad():
        torch.testing.assert_close(adapter(images), model(images), atol=1e-5, rtol=1e-5)
        assert adapter.patch_content(images).shape == (3, 64, 32)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = build_canvas_vit(TINY).eval()
    path = tmp_path / "vit.safetensors"
    save_canvas_vit(model, TINY, path, {"seed": 0})
    loaded = load_canvas_vit(path)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    config = json.loads(path.with_suffix(".json").read_text())
    config["architecture"]["embed_dim"] = 48
    path.with_suffix(".json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        load_canvas_vit(path)
    with pytest.raises(FileNotFoundError, match="pretrain"):
        load_canvas_vit(tmp_path / "missing.safetensors")
