"""`arrcoc train --images DIR --backbone ...` then `arrcoc eval --images DIR` on your own images and backbone:
a folder of photo crops, a random-weight timm ViT saved as safetensors and a random-weight transformers ViT
folder, all tiny and local; and the bad inputs of both commands (exit status 2, a message, no traceback)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as photos

from arrcoc.cli import main
from arrcoc.models.pretrained import load_backbone

TIMM_NAME = "vit_tiny_patch16_224"
TIMM_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
TIMM_FLAGS = [flag for key, value in TIMM_ARGS.items() for flag in ("--backbone-arg", f"{key}={value}")]
FAST = ["--epochs", "1", "--batch-size", "6"]
EVAL_FAST = ["--speed-images", "4", "--repeats", "1"]


def write_folder(root: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def crops(photo: np.ndarray, count: int, rng: np.random.Generator, size: int = 48) -> list[np.ndarray]:
    corners = zip(rng.integers(0, photo.shape[0] - size, count), rng.integers(0, photo.shape[1] - size, count))
    return [photo[y:y + size, x:x + size] for y, x in corners]


def stripes(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Generated images: 8 vertical stripes of random colours, 40x56."""
    return [rng.integers(0, 255, (1, 8, 3), dtype=np.uint8).repeat(7, axis=1).repeat(40, axis=0)
            for _ in range(count)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """train/ and val/ with three classes (astronaut and cat crops, generated stripes), 4 images each."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("photos")
    return {split: write_folder(root / split, {"astronaut": crops(photos.astronaut(), 4, rng),
                                               "cat": crops(photos.chelsea(), 4, rng), "stripes": stripes(4, rng)})
            for split in ("train", "val")}


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=3, **TIMM_ARGS)
    path = tmp_path_factory.mktemp("timm") / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "vit"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_run(folders, timm_weights, tmp_path_factory) -> Path:
    """A checkpoint trained on the folder with the timm ViT and a query file."""
    queries = tmp_path_factory.mktemp("queries") / "queries.txt"
    queries.write_text("where is the face?\n\nwhich stripe is red?\n")
    out = tmp_path_factory.mktemp("runs") / "timm"
    main(["train", "--images", str(folders["train"]), "--backbone", TIMM_NAME, "--weights", str(timm_weights),
          *TIMM_FLAGS, "--query-file", str(queries), "--out", str(out), *FAST])
    return out


def read_eval(folder: Path) -> tuple[dict, list[dict]]:
    result = json.loads((folder / "eval.json").read_text())
    return result["meta"], result["rows"]


def check_rows(rows: list[dict], accuracy: bool = True) -> None:
    """Budget 1.0 runs the unmodified model; percentages are percentages; photos have no boxes."""
    assert rows[0]["budget"] == 1.0 and rows[0]["agreement"] == 100.0
    assert all(0 <= row["agreement"] <= 100 and row["speedup"] > 0 and "box_coverage" not in row for row in rows)
    if accuracy:
        assert rows[0]["accuracy"] == rows[0]["full_token_accuracy"]
        assert all(0 <= row["accuracy"] <= 100 for row in rows)
    else:
        assert all("accuracy" not in row for row in rows)


def test_timm_backbone_trains_and_evaluates_from_the_record(timm_run, folders, timm_weights, tmp_path):
    metrics = json.loads((timm_run / "metrics.json").read_text())
    assert metrics["classes"] == ["astronaut", "cat", "stripes"] and metrics["train_images"] == 12
    assert metrics["backbone"] == TIMM_NAME and metrics["backbone_args"] == TIMM_ARGS
    assert metrics["weights"] == str(timm_weights.resolve()) and metrics["target"] == "attention"
    assert metrics["query_file"].endswith("queries.txt") and metrics["notes"] == []
    assert metrics["steps_this_run"] == 2 and "--images" in metrics["command"]
    config = json.loads((timm_run / "config.json").read_text())["config"]
    assert config["pixel_mean"] == [0.5, 0.5, 0.5] and config["pixel_std"] == [0.5, 0.5, 0.5]  # timm's ViT

    main(["eval", "--checkpoint", str(timm_run), "--images", str(folders["val"]), "--budgets", "1.0", "0.5", "0.25",
          "--out", str(tmp_path), *EVAL_FAST])  # no --backbone: the one metrics.json records
    meta, rows = read_eval(tmp_path)
    check_rows(rows)
    assert [row["budget"] for row in rows] == [1.0, 0.5, 0.25] and meta["test_images"] == 12
    assert meta["query_file"] == metrics["query_file"] and meta["accuracy_defined"]
    # queries but no boxes: how much the query changes the selection is measured, box coverage is not
    assert all("box_coverage" not in row and 0 <= row["query_overlap"] <= 100 for row in rows)
    assert rows[0]["query_overlap"] == 100.0  # every token kept: the query cannot change the selection
    assert (tmp_path / "eval.png").stat().st_size > 0 and "| budget |" in (tmp_path / "eval.md").read_text()


def test_a_head_without_the_folders_classes_gives_agreement_only(timm_run, folders, tmp_path, capsys):
    torch.manual_seed(1)
    five = timm.create_model(TIMM_NAME, pretrained=False, num_classes=5, **TIMM_ARGS)
    weights = tmp_path / "five.pth"
    torch.save({"model": five.state_dict(), "epoch": 3}, weights)  # a training script's checkpoint
    main(["eval", "--checkpoint", str(timm_run), "--images", str(folders["val"]), "--weights", str(weights),
          "--budgets", "1.0", "0.25", "--out", str(tmp_path), *EVAL_FAST])
    meta, rows = read_eval(tmp_path)
    check_rows(rows, accuracy=False)
    assert not meta["accuracy_defined"] and "has 5 outputs, the folder 3 classes" in meta["notes"][0]
    assert "accuracy is not defined" in (tmp_path / "eval.md").read_text()
    assert "accuracy is not defined" in capsys.readouterr().out


def test_transformers_folder_trains_and_evaluates(folders, hf_folder, tmp_path):
    out = tmp_path / "hf"
    main(["train", "--images", str(folders["train"]), "--backbone", str(hf_folder), "--target", "perturbation",
          "--out", str(out), *FAST])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == str(hf_folder.resolve()) and metrics["weights"] is None
    assert metrics["target"] == "perturbation" and metrics["outputs"] == 3 and metrics["query_file"] is None
    main(["eval", "--checkpoint", str(out), "--images", str(folders["val"]), "--budgets", "1.0", "0.25",
          "--max-images", "6", "--out", str(tmp_path / "eval"), *EVAL_FAST])
    meta, rows = read_eval(tmp_path / "eval")
    check_rows(rows)
    assert meta["test_images"] == 6 and "ViTForImageClassification" in meta["backbone"]


def test_one_class_trains_and_says_so(folders, timm_weights, tmp_path):
    one = write_folder(tmp_path / "one", {"cat": crops(photos.chelsea(), 3, np.random.default_rng(1))})
    main(["train", "--images", str(one), "--backbone", TIMM_NAME, "--weights", str(timm_weights), *TIMM_FLAGS,
          "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "3"])
    notes = json.loads((tmp_path / "run" / "metrics.json").read_text())["notes"]
    assert any("1 class: the labels say nothing" in note for note in notes)
    assert any("3 outputs, the folder 1 classes" in note for note in notes)


def test_num_classes_may_repeat_the_folders_class_count(folders, timm_weights, tmp_path):
    main(["train", "--images", str(folders["train"]), "--backbone", TIMM_NAME, "--weights", str(timm_weights),
          *TIMM_FLAGS, "--backbone-arg", "num_classes=3", "--out", str(tmp_path), *FAST])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["outputs"] == 3 and metrics["notes"] == []
    assert metrics["backbone_args"] == TIMM_ARGS  # the folder gives the head's size, to `arrcoc eval` too


def test_a_nested_pth_state_dict_loads_like_safetensors(timm_weights, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(timm_weights))
    torch.save({"state_dict": state}, tmp_path / "vit.pt")
    backbone = load_backbone(TIMM_NAME, tmp_path / "vit.pt", num_classes=7, model_args=TIMM_ARGS)
    assert backbone.num_classes == 3  # the weights' head, not the 7 asked for
    assert all(torch.equal(value, state[key]) for key, value in backbone.model.state_dict().items())


class Exploit:
    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "code ran"))


def bad_argv(tmp: Path, folders: dict[str, Path], weights: Path, hf: Path, case: str) -> list[str]:
    """The command line of a bad-input case, after making what it needs in ``tmp``."""
    train = ["train", "--out", str(tmp / "out"), *FAST]
    timm_byo = ["--backbone", TIMM_NAME, "--weights", str(weights), *TIMM_FLAGS]
    if case == "no class sub-folders":
        (tmp / "flat").mkdir()
        Image.new("RGB", (8, 8)).save(tmp / "flat" / "a.png")
        return [*train, "--images", str(tmp / "flat"), *timm_byo]
    if case == "a class without a readable image":
        write_folder(tmp / "broken", {"cat": crops(photos.chelsea(), 2, np.random.default_rng(0))})
        (tmp / "broken" / "dog").mkdir()
        (tmp / "broken" / "dog" / "1.jpg").write_bytes(b"not a jpeg")
        return [*train, "--images", str(tmp / "broken"), *timm_byo]
    if case == "a pickle as .pth weights":
        exploit = Exploit()
        exploit.target = str(tmp / "pwned")
        (tmp / "evil.pth").write_bytes(pickle.dumps(exploit, protocol=2))
        return [*train, "--images", str(folders["train"]), "--backbone", TIMM_NAME, "--weights", str(tmp / "evil.pth")]
    if case == "an empty query file":
        (tmp / "empty.txt").write_text("\n  \n")
        return [*train, "--images", str(folders["train"]), *timm_byo, "--query-file", str(tmp / "empty.txt")]
    if case == "eval --images on a canvas checkpoint":
        (tmp / "canvas_run").mkdir()
        (tmp / "canvas_run" / "metrics.json").write_text(json.dumps({"task": "cluttered"}))
        return ["eval", "--checkpoint", str(tmp / "canvas_run"), "--images", str(folders["val"])]
    images = ["--images", str(folders["train"])]
    return {
        "missing folder": [*train, "--images", str(tmp / "nowhere"), *timm_byo],
        "unknown timm name": [*train, *images, "--backbone", "vit_tiny_patch16"],
        "missing weights file": [*train, *images, "--backbone", TIMM_NAME, "--weights", str(tmp / "no.safetensors")],
        "weights of another architecture": [*train, *images, "--backbone", TIMM_NAME, "--weights", str(weights)],
        "a folder without config.json": [*train, *images, "--backbone", str(tmp)],
        "an unsupported architecture": [*train, *images, "--backbone", "resnet18"],
        "box target on photos": [*train, *images, *timm_byo, "--target", "box"],
        "a canvas ViT with --images": [*train, *images, "--backbone", "canvas_vit.safetensors"],
        "no backbone with --images": [*train, *images],
        "--weights on canvases": [*train, "--weights", str(weights)],
        "a timm name on canvases": [*train, "--backbone", TIMM_NAME],
        "--backbone-arg for a transformers folder": [*train, *images, "--backbone", str(hf), *TIMM_FLAGS],
        "a query file that is not there": [*train, *images, *timm_byo, "--query-file", str(tmp / "q.txt")],
        "num_classes other than the folder's classes": [*train, *images, *timm_byo, "--backbone-arg", "num_classes=2"],
    }[case]


BAD = {  # case: what the message must say (what was expected, what was given)
    "missing folder": ("does not exist", "one sub-folder of images per class", "nowhere"),
    "no class sub-folders": ("has no class sub-folders", "flat"),
    "a class without a readable image": ("hold no readable image", "broken/dog"),
    "unknown timm name": ("neither a folder nor a timm model name", "'vit_tiny_patch16'", "timm.list_models"),
    "missing weights file": ("weights file", "no.safetensors not found", ".safetensors, .pth or .pt"),
    "weights of another architecture": ("do not fit timm vit_tiny_patch16_224",
                                        "cls_token: model (1, 1, 192) vs file (1, 1, 32)", "--backbone-arg"),
    "a folder without config.json": ("is not a transformers model folder", "no config.json"),
    "an unsupported architecture": ("unsupported backbone timm.models.resnet.ResNet", "supported families"),
    "box target on photos": ("photos have no boxes", "attention or perturbation", "got 'box'"),
    "a canvas ViT with --images": ("timm model name", "transformers folder", "got canvas_vit.safetensors"),
    "no backbone with --images": ("--backbone is a timm model name", "got none"),
    "--weights on canvases": ("--weights: only with --images DIR",),
    "a timm name on canvases": ("run on a canvas ViT (a .safetensors file)", f"got --backbone {TIMM_NAME}"),
    "--backbone-arg for a transformers folder": ("is a transformers folder", "settings {'img_size': 32"),
    "a query file that is not there": ("query file", "q.txt not found", "one query sentence a line"),
    "num_classes other than the folder's classes": ("--backbone-arg num_classes=2", "one output per class of the "
                                                     "folder (3 in", "leave num_classes out"),
    "an empty query file": ("empty.txt holds no sentence", "one query sentence a line"),
    "a pickle as .pth weights": ("not a plain PyTorch state dict", "Unsupported global: GLOBAL getattr"),
    "eval --images on a canvas checkpoint": ("was not trained on images", "--backbone NAME_OR_DIR"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_with_status_2_and_says_what_was_expected(case, folders, timm_weights, hf_folder, tmp_path,
                                                                  capsys):
    argv = bad_argv(tmp_path, folders, timm_weights, hf_folder, case)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2, error
    missing = [part for part in BAD[case] if part not in error]
    assert not missing and "Traceback" not in error, f"{case}: {error!r} does not say {missing}"
    assert not (tmp_path / "pwned").exists()


def test_eval_without_images_on_a_folder_checkpoint_points_to_images(timm_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(timm_run)])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "was trained on the images in" in error and "--images DIR" in error
