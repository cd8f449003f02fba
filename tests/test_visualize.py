"""arrcoc.visualize: the masks behind the pictures, the figures, and `arrcoc visualize` end to end on an
untrained ARR-COC over the committed canvas ViT (pictures of machinery, not of results)."""

import re
import runpy
import sys

import pytest
import torch
from PIL import Image

import arrcoc
from arrcoc import visualize
from arrcoc.backbones.tiers import MERGED, NORMAL, REFINED
from arrcoc.commands import visualize as visualize_command
from arrcoc.commands.common import load_trained_arrcoc
from arrcoc.config import REPO_ROOT
from arrcoc.models.canvas_vit import load_canvas_vit
from arrcoc.relevance import RelevanceConfig
from arrcoc.reporting import save_figure


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return arrcoc.attach(load_canvas_vit(), budget=0.125, config=RelevanceConfig(target="box"))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("arrcoc")
    model.save_pretrained(folder)
    return folder


def explanation(kept: torch.Tensor, tiers: torch.Tensor | None = None) -> visualize.Explanation:
    maps = {name: torch.rand(8, 8) for name in (*visualize.WAYS_OF_KNOWING, "relevance")}
    return visualize.Explanation(torch.rand(3, 64, 64), None, maps, kept, tiers, int(kept.sum()), (8, 8))


def test_kept_mask_and_dimming_mark_exactly_the_kept_patches():
    kept = torch.tensor([[0, 9, 63], [5, 6, 7]])
    mask = visualize.kept_mask(kept, 8, 8)
    assert mask.shape == (2, 8, 8) and mask.sum().item() == 6
    assert mask[0, 0, 0] and mask[0, 1, 1] and mask[0, 7, 7] and mask[1, 0, 5:8].all()
    shade = visualize.dim_factors(explanation(mask[0]))
    assert torch.equal(shade == 1.0, mask[0]) and (shade[~mask[0]] == visualize.DIMMED).all()
    with pytest.raises(ValueError, match=r"kept indices must lie in \[0, 64\)"):
        visualize.kept_mask(torch.tensor([[64]]), 8, 8)


def test_tiers_dim_only_merged_regions():
    regions = torch.tensor([[MERGED, NORMAL], [REFINED, MERGED]])
    tiers = regions.repeat_interleave(2, 0).repeat_interleave(2, 1)
    shade = visualize.dim_factors(explanation(torch.zeros(4, 4, dtype=torch.bool), tiers))
    assert torch.equal(shade == 1.0, tiers != MERGED)


def test_a_model_with_tiers_is_drawn_by_tier():
    model = arrcoc.attach(load_canvas_vit(), budget=0.75, config=RelevanceConfig(tiers=True, refined_regions=1))
    e = visualize.explain(model, visualize.demo_canvases().images[0])[0]
    counts = model.tier_counts(8, 8)
    assert e.tokens == counts.total == counts.merged + 4 * counts.normal + 16 * counts.refined
    assert (e.tiers == REFINED).sum() == 4 * counts.refined and (e.tiers == NORMAL).sum() == 4 * counts.normal
    figure = visualize.overlay_figure([e])
    assert any(ax.get_title().startswith(f"tiers: {e.tokens} patch tokens") for ax in figure.axes)


def test_outlines_follow_the_patch_borders_in_pixels():
    one = torch.zeros(8, 8, dtype=torch.bool)
    one[2, 3] = True
    assert sorted(visualize.outline_segments(one, (8, 8))) == sorted(
        [((24, 16), (32, 16)), ((24, 24), (32, 24)), ((24, 16), (24, 24)), ((32, 16), (32, 24))])
    pair = one.clone()
    pair[2, 4] = True  # the shared edge is not part of the outline
    assert len(visualize.outline_segments(pair, (8, 8))) == 6
    assert len(visualize.cell_lines(torch.ones(1, 1), (64, 64), (8, 8))) == 14  # 7 inner lines each way


def test_explanations_match_the_model_and_draw_one_panel_per_query(model, tmp_path):
    image = visualize.demo_canvases().images[0]
    queries = ["which digit is red?", "what number is in the top left?", "which digit is blue?"]
    embeddings = torch.nn.functional.normalize(torch.randn(3, 384), dim=-1)
    explanations = visualize.explain(model, image, queries, embeddings=embeddings)
    for i, e in enumerate(explanations):
        kept = model.relevance_map(image[None], embeddings[i:i + 1]).kept
        assert torch.equal(e.kept, visualize.kept_mask(kept, 8, 8)[0]) and e.tokens == 8
        assert e.maps["relevance"].shape == (8, 8) and e.query == queries[i]
    figure = visualize.queries_figure([explanations])
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert sum(f'"{q}"' in t.replace("\n", " ") for q in queries for t in titles) == 3
    path = save_figure(figure, tmp_path / "queries.png", dpi=50)
    with Image.open(path) as png:
        width, height = figure.get_size_inches() * 50
        assert png.format == "PNG" and png.size == (round(width), round(height))
    assert visualize.figure_image(visualize.overlay_figure(explanations[:1])).ndim == 3
    with pytest.raises(ValueError, match=re.escape("one (3, H, W) RGB image")):
        visualize.explain(model, image[None], queries)


def test_visualize_command_writes_the_three_figures(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    paths = visualize_command.main(["--checkpoint", str(checkpoint), "--canvas", "2", "--query", "which digit is red?",
                            "--query", "what number is in the top left?", "--budget", "0.25", "--out", str(out)])
    assert set(paths) == {"overlay", "ways_of_knowing", "queries"}
    printed = capsys.readouterr().out
    for path in paths.values():
        assert path.parent == out and str(path) in printed
        with Image.open(path) as png:
            png.verify()
            assert png.size[0] > 400 and png.size[1] > 200
    assert printed.count("with all tokens") == 2  # each query's answer at the budget and with all tokens


def test_an_image_file_is_resized_with_a_note(checkpoint, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (100, 50), (200, 30, 30)).save(photo)
    paths = visualize_command.main(["--checkpoint", str(checkpoint), "--image", str(photo), "--out", str(tmp_path)])
    assert "resized from 100x50 to 64x64 px" in capsys.readouterr().out and paths["overlay"].is_file()


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "image file missing.png not found"),
    (["--image", "{text}"], "is not a readable image"),
    (["--budget", "1.5"], "a budget ratio must be in (0, 1], got 1.5"),
    (["--budget", "65"], "token count budget K must be in [1, 64] (number of patches), got 65"),
    (["--canvas", "64"], "canvas must be an index from 0 to 63"),
    (["--checkpoint", "{tmp}"], "is not an ARR-COC checkpoint folder"),
])
def test_bad_input_is_refused_with_what_was_expected(checkpoint, tmp_path, capsys, args, message):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    args = [a.format(text=text, tmp=tmp_path) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(checkpoint)]
    with pytest.raises(SystemExit) as exit_info:
        visualize_command.main([*args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_query_demo_writes_one_figure_of_all_queries(checkpoint, tmp_path, capsys):
    demo = runpy.run_path(str(REPO_ROOT / "demos" / "query_relevance.py"))
    path = demo["main"](["--checkpoint", str(checkpoint), "--canvas", "3", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.count("with all tokens") == 4 and f"wrote {path}" in printed  # the canvas's four questions
    with Image.open(path) as png:
        assert png.format == "PNG"


def test_bad_settings_and_missing_benchmark_models(tmp_path, capsys):
    config = tmp_path / "visualize.yaml"
    config.write_text("queries: [a]\nbudgte: 0.5\n")
    with pytest.raises(SystemExit):
        visualize_command.main(["--config", str(config)])
    assert "unknown visualize setting key(s) ['budgte']" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="`arrcoc bench canvas` writes it"):
        load_trained_arrcoc("query", tmp_path)
    with pytest.raises(ValueError, match="task must be one of"):
        load_trained_arrcoc("mnist", tmp_path)


def test_the_web_demo_names_its_extra_when_gradio_is_missing(monkeypatch):
    from arrcoc import web

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'arrcoc[web]'")):
        web.require_gradio()
