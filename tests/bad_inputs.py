"""Every public entry point with the bad inputs it was tried with: one list, from which come both the tests
(tests/test_bad_inputs.py: each row raises its error, and the message says what was expected and what was
given) and the table in docs/bad_inputs.md (``python tests/bad_inputs.py`` rewrites it; a test fails when
the table and the list differ).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import arrcoc
from arrcoc.config import REPO_ROOT
from arrcoc.data.image_folder import read_image_folder
from arrcoc.models.pretrained import load_backbone
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance import ARRCOC, AdaptationConfig, RelevanceConfig
from arrcoc.rules import build_rule
from arrcoc.rules.relaxation import Energy, Relaxation, relax
from arrcoc.training import Batch, Trainer, TrainerConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


class Env:
    """A small model, two images and a scratch folder (shown as ``<dir>`` in the table)."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def model(self, budget: float = 0.25, **config: Any) -> ARRCOC:
        return arrcoc.attach(toy_vit(), budget=budget, config=config or None)

    def with_nan(self, value: float = float("nan")) -> torch.Tensor:
        images = self.images.clone()
        images[0, 0, 0, 0] = value
        return images

    def checkpoint(self) -> Path:
        """A valid save_pretrained folder of the default model."""
        self.model().save_pretrained(self.dir / "ckpt")
        return self.dir / "ckpt"

    def config_json(self) -> tuple[Path, dict[str, Any]]:
        path = self.checkpoint() / "config.json"
        return path, json.loads(path.read_text())

    def weights(self) -> Path:
        path, meta = self.config_json()
        return path.parent / meta["weights"]

    def yaml(self, text: str) -> Path:
        path = self.dir / "config.yaml"
        path.write_text(text)
        return path

    def trained(self, **config: Any) -> Trainer:
        """A trainer whose checkpoint_dir holds a training checkpoint after one step with ``config``."""
        trainer = Trainer(self.model(**config), TrainerConfig(checkpoint_dir=str(self.dir / "run"), progress=False))
        trainer.fit([Batch(self.images)])
        return trainer

    def resume(self, **config: Any) -> None:
        Trainer(self.model(**config), TrainerConfig(checkpoint_dir=str(self.dir / "run"), progress=False)).fit(
            [Batch(self.images)], resume=True)


def _edit_trainer_state(env: Env, key: str, value: Any) -> None:
    env.trained()
    state = next((env.dir / "run" / "training").glob("step-*")) / "trainer_state.json"
    meta = json.loads(state.read_text())
    meta[key] = value
    state.write_text(json.dumps(meta))


def _overwrite_tail(path: Path, tail: bytes) -> None:
    path.write_bytes(path.read_bytes()[:-len(tail)] + tail)


def _pickle_as_weights(env: Env) -> None:
    """A pickle that would run code if unpickled, named as the weights, with a matching checksum."""
    import hashlib
    import pickle

    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (env.dir / "pwned", "code ran"))

    path, meta = env.config_json()
    weights = path.parent / meta["weights"]
    weights.write_bytes(pickle.dumps(Exploit()))
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    path.write_text(json.dumps(meta))


class _Quadratic(Energy):
    def init_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.clone()]

    def energy(self, states: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return 0.5 * states[0].pow(2).sum(-1)

    def output(self, states: list[torch.Tensor]) -> torch.Tensor:
        return states[0]


def _blank(image: Image.Image) -> torch.Tensor:
    """A preprocessing that ignores the image (the folder's errors come before any pixel matters)."""
    return torch.zeros(3, 8, 8)


def _files(env: Env, names: list[str]) -> Path:
    """``<dir>/photos`` holding ``names``: an 8x8 image for each .png, text (not an image) for anything else."""
    folder = env.dir / "photos"
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            Image.new("RGB", (8, 8)).save(path)
        else:
            path.write_text("not an image")
    return folder


def _tiny_timm_weights(env: Env) -> Path:
    path = env.dir / "vit.safetensors"
    save_file(toy_vit(num_classes=3).state_dict(), str(path))
    return path


def _pickle_weights(env: Env) -> Path:
    """A .pth that would run code if unpickled."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (env.dir / "pwned", "code ran"))

    path = env.dir / "vit.pth"
    path.write_bytes(pickle.dumps(Exploit(), protocol=2))
    return path


def _mismatched_transformers_folder(env: Env) -> Path:
    """A transformers ViT folder whose config.json says width 48 while its weights are 32 wide."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = env.dir / "vit"
    sizes = {"image_size": 32, "patch_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "num_labels": 3}
    ViTForImageClassification(ViTConfig(hidden_size=32, **sizes)).save_pretrained(folder)
    ViTConfig(hidden_size=48, architectures=["ViTForImageClassification"], **sizes).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Case:
    entry: str  # the public entry point
    bad_input: str  # what was given
    call: Callable[[Env], object]
    error: type[BaseException]
    says: tuple[str, ...]  # parts of the message: what was expected, what was given


FOLDER = "arrcoc.data.image_folder.read_image_folder(root, preprocess) (arrcoc train / eval --images)"
BACKBONE = "arrcoc.models.pretrained.load_backbone(name_or_dir, weights) (arrcoc train / eval --backbone --weights)"
FORWARD = "ARRCOC(images, query) (also relevance_map, learn, adapt, set_probe)"
ATTACH = "arrcoc.attach(model, budget, config) / RelevanceConfig"
CASES: list[Case] = [
    # ---- images and queries ---------------------------------------------------------------------------------
    Case(FORWARD, "images not a tensor (a list)", lambda e: e.model()([1, 2]), ValueError, ("4-D tensor", "got list")),
    Case(FORWARD, "images of shape (3, 32, 32)", lambda e: e.model()(e.images[0]), ValueError,
         ("(batch, channels, height, width)", "got (3, 32, 32)")),
    Case(FORWARD, "1 channel instead of 3", lambda e: e.model()(e.images[:, :1]), ValueError,
         ("must have 3 channels", "got 1")),
    Case(FORWARD, "48x48 images for a fixed 32x32 model", lambda e: e.model()(torch.rand(2, 3, 48, 48)), ValueError,
         ("the model's 32x32", "48x48", "dynamic_img_size")),
    Case(FORWARD, "30x30 images (patch 8)", lambda e: e.model()(torch.rand(2, 3, 30, 30)), ValueError,
         ("divisible by the patch size 8x8", "30x30")),
    Case(FORWARD, "uint8 images", lambda e: e.model()((e.images * 255).to(torch.uint8)), TypeError,
         ("floating point in the model's dtype torch.float32", "got torch.uint8")),
    Case(FORWARD, "bfloat16 images, float32 model, no autocast", lambda e: e.model()(e.images.bfloat16()), TypeError,
         ("torch.float32", "torch.autocast", "got torch.bfloat16")),
    Case(FORWARD, "a NaN pixel", lambda e: e.model()(e.with_nan()), ValueError, ("must be finite", "1 NaN")),
    Case(FORWARD, "an infinite pixel", lambda e: e.model()(e.with_nan(float("inf"))), ValueError,
         ("must be finite", "1 infinite")),
    Case(FORWARD, "empty batch (0 images)", lambda e: e.model()(e.images[:0]), ValueError,
         ("at least one image", "batch of 0")),
    Case(FORWARD, "3 query embeddings for 2 images", lambda e: e.model()(e.images, torch.randn(3, 384)), ValueError,
         ("one query per image", "3 queries for 2 images")),
    Case(FORWARD, "query embeddings of width 16 (the config says 384)",
         lambda e: e.model()(e.images, torch.randn(2, 16)), ValueError, ("(batch, 384)", "got (2, 16)")),
    Case(FORWARD, "integer query embeddings", lambda e: e.model()(e.images, torch.ones(2, 384, dtype=torch.long)),
         TypeError, ("floating point", "got torch.int64")),
    Case(FORWARD, "a NaN in the query embeddings",
         lambda e: e.model()(e.images, torch.full((2, 384), float("nan"))), ValueError, ("must be finite", "NaN")),
    Case(FORWARD, "a query that is neither tensor nor text (an int)", lambda e: e.model()(e.images, 5), TypeError,
         ("tensor of embeddings, a string or a list of strings", "got int")),
    Case(FORWARD, "text queries without a text encoder", lambda e: e.model()(e.images, ["red?", "blue?"]),
         ValueError, ("text query needs a text encoder", "text_encoder=")),
    Case(FORWARD, "budget of 100 tokens on a 16-patch grid", lambda e: e.model(budget=100)(e.images), ValueError,
         ("[1, 16]", "got 100")),
    Case(FORWARD, "tiers with 1 refined region and a 4-token budget",
         lambda e: e.model(tiers=True, refined_regions=1)(e.images), ValueError, ("needs at least 19", "budget of 4")),
    Case(FORWARD, "tiers on an odd (3x3) patch grid",
         lambda e: arrcoc.attach(toy_vit(img_size=24), budget=0.5, config={"tiers": True})(torch.rand(1, 3, 24, 24)),
         ValueError,
         ("even sides", "got 3x3")),
    # ---- attach and configuration ---------------------------------------------------------------------------
    Case(ATTACH, "an nn.Linear as backbone", lambda e: arrcoc.attach(nn.Linear(2, 2)), TypeError,
         ("supported families", "torch.nn.modules.linear.Linear")),
    Case(ATTACH, "budget 0", lambda e: e.model(budget=0), ValueError, ("count budget must be >= 1", "got 0")),
    Case(ATTACH, "the neighbourhood pooling the learned field replaced", lambda e: e.model(neighbourhood=1.5), KeyError,
         ("['neighbourhood'] were removed", "neighbourhood: 0")),
    Case(ATTACH, "budget -1", lambda e: e.model(budget=-1), ValueError, ("count budget must be >= 1", "got -1")),
    Case(ATTACH, "budget 1.5 (neither a fraction nor a count)", lambda e: e.model(budget=1.5), ValueError,
         ("budget ratio must be in (0, 1]", "got 1.5")),
    Case(ATTACH, "budget 2.0 (a count given as a float)", lambda e: e.model(budget=2.0), ValueError,
         ("budget ratio must be in (0, 1]", "give the int 2")),
    Case(ATTACH, "budget NaN", lambda e: e.model(budget=float("nan")), ValueError,
         ("budget ratio must be in (0, 1]", "got nan")),
    Case(ATTACH, "budget 'half'", lambda e: e.model(budget="half"), TypeError,
         ("a ratio (float in (0, 1]) or a token count (int >= 1)", "'half'")),
    Case(ATTACH, "config that is a list", lambda e: arrcoc.attach(toy_vit(), config=[0.25]), TypeError,
         ("RelevanceConfig or a dict", "got list")),
    Case(ATTACH, "config key typo 'budgett'", lambda e: e.model(budgett=0.5), KeyError, ("known keys", "'budgett'")),
    Case(ATTACH, "an ablation switch at the top level ('field')", lambda e: e.model(field=False), KeyError,
         ("ablation switches now", "ablate.field")),
    Case(ATTACH, "a removed probe ('propositional_measure')",
         lambda e: e.model(propositional_measure="self-information"), KeyError, ("were removed", "docs/decisions.md")),
    Case(ATTACH, "ablate switch typo 'feild'", lambda e: e.model(ablate={"feild": False}), KeyError,
         ("unknown ablate switch", "'feild'")),
    Case(ATTACH, "rule for an unknown sub-network 'feild'", lambda e: e.model(rules={"feild": {"name": "ep"}}),
         KeyError, ("sub-networks: ['allocator'", "['feild']")),
    Case(ATTACH, "unknown rule name 'eq-prop'", lambda e: e.model(rules={"field": {"name": "eq-prop"}}), KeyError,
         ("known rules: backprop", "'eq-prop'")),
    Case(ATTACH, "unknown rule hyper-parameter 'betta'",
         lambda e: e.model(rules={"field": {"name": "ep", "betta": 1}}), TypeError,
         ("it accepts ['backtracks', 'beta'", "['betta']")),
    Case(ATTACH, "rule entry without a name", lambda e: e.model(rules={"field": {"beta": 1}}), ValueError,
         ("mapping with a rule 'name' (energy over patches: ep, chl)", "got {'beta': 1}")),
    Case(ATTACH, "a one-layer rule for the two-layer allocator",
         lambda e: e.model(rules={"allocator": {"name": "infonce-hebbian"}}), TypeError,
         ("exactly one nn.Linear", "has 2")),
    Case(ATTACH, "rule hyper-parameter value typo (form 'sangr')",
         lambda e: e.model(rules={"perspectival_encoder": {"name": "hebbian-oja", "form": "sangr"}}), ValueError,
         ("form must be one of ('sanger'", "got 'sangr'")),
    Case(ATTACH, "relaxation key typo 'stepsize'", lambda e: e.model(relaxation={"stepsize": 0.1}), KeyError,
         ("known keys: ['backtracks', 'gradient_only', 'inference_step_size'", "['stepsize']")),
    Case(ATTACH, "relaxation step_size -1", lambda e: e.model(relaxation={"step_size": -1}), ValueError,
         ("step_size > 0", "step_size=-1")),
    Case(ATTACH, "optimizer 'adamw'", lambda e: e.model(optimizer={"name": "adamw"}), ValueError,
         ("one of ['adam', 'sgd']", "got 'adamw'")),
    Case(ATTACH, "target 'boxes'", lambda e: e.model(target="boxes"), ValueError,
         ("one of ('attention', 'perturbation', 'box', 'reward', 'set')", "got 'boxes'")),
    Case(ATTACH, "dropped 'drop'", lambda e: e.model(dropped="drop"), ValueError,
         ("one of ('discard', 'fuse', 'merge')", "got 'drop'")),
    Case(ATTACH, "optimizer key 'momentum'", lambda e: e.model(optimizer={"name": "adam", "momentum": 0.9}), KeyError,
         ("unknown optimizer key(s) ['momentum']", "'subnetwork_lr'")),
    Case(ATTACH, "optimizer.subnetwork_lr for 'fields'",
         lambda e: e.model(optimizer={"name": "adam", "subnetwork_lr": {"fields": 0.03}}), KeyError,
         ("unknown sub-network(s) ['fields']", "'field'")),
    Case(ATTACH, "participatory_contrast 'images'", lambda e: e.model(participatory_contrast="images"), ValueError,
         ("participatory_contrast must be one of ('batch', 'patches')", "got 'images'")),
    Case(ATTACH, "participatory_contrast 'patches' with the batch-contrast rule",
         lambda e: e.model(participatory_contrast="patches"), ValueError,
         ("use rules.participatory {name: contrastive-hebbian}", "infonce-hebbian contrasts the batch")),
    # ---- YAML -----------------------------------------------------------------------------------------------
    Case("RelevanceConfig.from_yaml(path)", "a missing file", lambda e: RelevanceConfig.from_yaml(e.dir / "no.yaml"),
         FileNotFoundError, ("config file", "no.yaml' not found")),
    Case("RelevanceConfig.from_yaml(path)", "a YAML list instead of a mapping",
         lambda e: RelevanceConfig.from_yaml(e.yaml("- 0.25\n")), ValueError, ("mapping of keys", "got list")),
    Case("RelevanceConfig.from_yaml(path)", "a key typo in the YAML",
         lambda e: RelevanceConfig.from_yaml(e.yaml("relevance:\n  budgett: 0.5\n")), KeyError,
         ("known keys", "'budgett'")),
    Case("RelevanceConfig.from_yaml(path)", "a Python tag (never constructed, nothing runs)",
         lambda e: RelevanceConfig.from_yaml(e.yaml("relevance: !!python/object/apply:os.system ['touch pwned']\n")),
         ValueError, ("is not valid YAML: could not determine a constructor", "python/object/apply:os.system")),
    # ---- learning -------------------------------------------------------------------------------------------
    Case("ARRCOC.learn / fill_grads", "a (2, 5) target for 2 images of 16 patches",
         lambda e: e.model().learn(e.images, target=torch.rand(2, 5)), ValueError,
         ("(batch, patches) = (2, 16)", "got (2, 5)")),
    Case("ARRCOC.learn / fill_grads", "a NaN target", lambda e: e.model().learn(e.images, target=torch.full((2, 16),
                                                                                                     float("nan"))),
         ValueError, ("values in [0, 1]", "nan")),
    Case("ARRCOC.learn / fill_grads", "target 'box' without boxes", lambda e: e.model(target="box").learn(e.images),
         ValueError, ("boxes (batch, 4)", "got boxes=None")),
    Case("ARRCOC.learn / fill_grads", "boxes of shape (2, 3)",
         lambda e: e.model(target="box").learn(e.images, boxes=torch.rand(2, 3)), ValueError,
         ("(batch, 4)", "got (2, 3)")),
    Case("ARRCOC.learn / fill_grads", "3 labels for 2 images",
         lambda e: e.model(target="reward").learn(e.images, labels=torch.zeros(3, dtype=torch.long)), ValueError,
         ("(2,) class indices", "got (3,)")),
    # ---- checkpoints ----------------------------------------------------------------------------------------
    Case("ARRCOC.from_pretrained(dir, model)", "a folder without config.json",
         lambda e: ARRCOC.from_pretrained(e.dir / "nothing", toy_vit()), FileNotFoundError,
         ("config.json is missing", "nothing")),
    Case("ARRCOC.from_pretrained(dir, model)", "config.json that is not JSON",
         lambda e: (e.config_json()[0].write_text("{not json"), ARRCOC.from_pretrained(e.dir / "ckpt", toy_vit())),
         ValueError, ("not valid JSON", "config.json")),
    Case("ARRCOC.from_pretrained(dir, model)", "schema version 99",
         lambda e: (e.config_json()[0].write_text(json.dumps({**e.config_json()[1], "schema_version": 99})),
                    ARRCOC.from_pretrained(e.dir / "ckpt", toy_vit())), ValueError,
         ("schema version 99", "expected 3")),
    Case("ARRCOC.from_pretrained(dir, model)", "a checkpoint from before the field's redesign (schema 2)",
         lambda e: (e.config_json()[0].write_text(json.dumps({**e.config_json()[1], "schema_version": 2})),
                    ARRCOC.from_pretrained(e.dir / "ckpt", toy_vit())), ValueError,
         ("schema version 2", "retrain it")),
    Case("ARRCOC.from_pretrained(dir, model)", "the weights file deleted",
         lambda e: (e.weights().unlink(), ARRCOC.from_pretrained(e.dir / "ckpt", toy_vit())), FileNotFoundError,
         ("named in", "is missing")),
    Case("ARRCOC.from_pretrained(dir, model)", "8 bytes of the weights overwritten",
         lambda e: (_overwrite_tail(e.weights(), b"garbage!"), ARRCOC.from_pretrained(e.dir / "ckpt", toy_vit())),
         ValueError,
         ("does not match the checksum", "corrupted or replaced")),
    Case("ARRCOC.from_pretrained(dir, model)", "a malicious pickle as weights, checksum updated (never unpickled)",
         lambda e: (_pickle_as_weights(e), ARRCOC.from_pretrained(e.dir / "ckpt", toy_vit())), ValueError,
         ("not a valid safetensors file", "relevance-")),
    Case("ARRCOC.from_pretrained(dir, model)", "a checkpoint saved for another backbone (token width 32 vs 48)",
         lambda e: ARRCOC.from_pretrained(e.checkpoint(), toy_vit(embed_dim=48)), ValueError,
         ("does not fit this backbone (VisionTransformer", "size mismatch")),
    Case("ARRCOC.from_pretrained(dir, model)", "a config key this version does not know",
         lambda e: (e.config_json()[0].write_text(json.dumps({**e.config_json()[1], "config": {"budgett": 1}})),
                    ARRCOC.from_pretrained(e.dir / "ckpt", toy_vit())), KeyError, ("known keys", "'budgett'")),
    # ---- training -------------------------------------------------------------------------------------------
    Case("Trainer.fit(batches, resume=True)", "no checkpoint_dir",
         lambda e: Trainer(e.model(), TrainerConfig(progress=False)).fit([Batch(e.images)], resume=True), ValueError,
         ("needs TrainerConfig.checkpoint_dir", "resume=True")),
    Case("Trainer.fit(batches, resume=True)", "a checkpoint trained with another config (budget 0.5)",
         lambda e: (e.trained(), e.resume(budget=0.5)), ValueError,
         ("different configuration", "relevance.budget: checkpoint 0.25, this run 0.5")),
    Case("Trainer.fit(batches, resume=True)", "a checkpoint written by 2 processes, resumed by 1",
         lambda e: (_edit_trainer_state(e, "world_size", 2), e.resume()), ValueError,
         ("resume with the same number", "written by 2 processes, this run has 1")),
    Case("Trainer.fit(batches, resume=True)", "trainer_state.safetensors corrupted",
         lambda e: (e.trained(), next((e.dir / "run" / "training").glob("step-*/trainer_state.safetensors"))
                    .write_bytes(b"corrupted"), e.resume()), ValueError,
         ("does not match the checksum", "trainer_state.safetensors")),
    Case("TrainerConfig", "epochs 0", lambda e: TrainerConfig(epochs=0), ValueError, (">= 1", "got 0")),
    Case("TrainerConfig", "schedule 'cosin'", lambda e: TrainerConfig(schedule="cosin"), ValueError,
         ("'cosine' or 'constant'", "got 'cosin'")),
    Case("AdaptationConfig", "optimizer 'rmsprop'", lambda e: AdaptationConfig(optimizer="rmsprop"), ValueError,
         ("'sgd' or 'adam'", "got 'rmsprop'")),
    Case("AdaptationConfig", "lr -1", lambda e: AdaptationConfig(lr=-1.0), ValueError, ("lr >= 0", "lr=-1.0")),
    Case("AdaptationConfig", "max_grad_norm 0", lambda e: AdaptationConfig(max_grad_norm=0.0), ValueError,
         ("max_grad_norm > 0", "max_grad_norm=0.0")),
    Case("AdaptationConfig", "target 'box' (needs labels)", lambda e: AdaptationConfig(target="box"), ValueError,
         ("one of ('perturbation', 'attention', 'set', 'reward')", "got 'box'")),
    Case("AdaptationConfig", "negative probe_confidence",
         lambda e: AdaptationConfig(probe_confidence=-1.0), ValueError,
         ("probe_confidence >= 0", "probe_confidence=-1.0")),
    # ---- rules ----------------------------------------------------------------------------------------------
    Case("arrcoc.rules.build_rule(config, subnet)", "a config that is a number",
         lambda e: build_rule(5, nn.Linear(2, 2)), ValueError, ("a name or a mapping with a 'name' key", "got 5")),
    Case("arrcoc.rules.build_rule(config, subnet)", "a Linear rule on a module without Linear layers",
         lambda e: build_rule("hebbian-oja", nn.Tanh()), TypeError, ("trains nn.Linear layers", "has none")),
    Case("arrcoc.rules.relaxation.Relaxation(...)", "steps 0",
         lambda e: Relaxation(steps=0), ValueError, ("steps > 0", "got steps=0")),
    Case("arrcoc.rules.relaxation.relax(model, x, ...)", "a target without a nudge (beta 0)",
         lambda e: relax(_Quadratic(nn.Linear(1, 1)), torch.zeros(1, 2), target=torch.zeros(1, 2)), ValueError,
         ("needs beta != 0", "target given")),
    # ---- your own images and backbone (arrcoc train / eval --images DIR --backbone NAME_OR_DIR) ----------------
    Case(FOLDER, "a folder that does not exist", lambda e: read_image_folder(e.dir / "nowhere", _blank),
         FileNotFoundError, ("one sub-folder of images per class", "nowhere does not exist")),
    Case(FOLDER, "images but no class sub-folders", lambda e: read_image_folder(_files(e, ["a.png"]), _blank),
         ValueError, ("one sub-folder of images per class", "has no class sub-folders")),
    Case(FOLDER, "a class folder whose only image cannot be decoded",
         lambda e: read_image_folder(_files(e, ["cat/1.png", "dog/1.jpg"]), _blank), ValueError,
         ("expected image files", "photos/dog'] hold no readable image")),
    Case(BACKBONE, "an unknown timm name 'vit_tiny_patch16'", lambda e: load_backbone("vit_tiny_patch16"), ValueError,
         ("timm.list_models", "'vit_tiny_patch16' is neither a folder nor a timm model name")),
    Case(BACKBONE, "a weights file that does not exist",
         lambda e: load_backbone("vit_tiny_patch16_224", e.dir / "vit.safetensors"), FileNotFoundError,
         ("expected a .safetensors, .pth or .pt file", "vit.safetensors not found")),
    Case(BACKBONE, "weights in a .npz file",
         lambda e: load_backbone("vit_tiny_patch16_224", _files(e, ["vit.npz"]) / "vit.npz"), ValueError,
         (".safetensors, .pth or .pt file", "got vit.npz")),
    Case(BACKBONE, "weights of a 32-wide 1-block ViT for the default vit_tiny_patch16_224",
         lambda e: load_backbone("vit_tiny_patch16_224", _tiny_timm_weights(e)), ValueError,
         ("do not fit timm vit_tiny_patch16_224", "cls_token: model (1, 1, 192) vs file (1, 1, 32)")),
    Case(BACKBONE, "a malicious pickle as .pth weights (never unpickled)",
         lambda e: load_backbone("vit_tiny_patch16_224", _pickle_weights(e)), ValueError,
         ("not a plain PyTorch state dict", "Unsupported global")),
    Case(BACKBONE, "a folder without config.json", lambda e: load_backbone(e.dir), FileNotFoundError,
         ("not a transformers model folder", "no config.json")),
    Case(BACKBONE, "a transformers folder whose weights do not fit its config.json (width 32 vs 48)",
         lambda e: load_backbone(_mismatched_transformers_folder(e)), ValueError,
         ("do not fit the ViTForImageClassification its config.json describes", "model (3, 48) vs file (3, 32)")),
    Case(BACKBONE, "an unsupported architecture (timm resnet18)", lambda e: load_backbone("resnet18"), TypeError,
         ("supported families", "timm.models.resnet.ResNet")),
]


def run(case: Case) -> BaseException:
    """Call the case in a fresh scratch folder; return what it raised (or raise AssertionError if nothing)."""
    folder = Path(tempfile.mkdtemp())
    try:
        torch.manual_seed(0)
        case.call(Env(folder))
    except BaseException as error:  # noqa: BLE001 - what it raises is what is checked
        error.message = str(error).replace(str(folder), "<dir>").replace(str(REPO_ROOT), "<repo>")
        if (folder / "pwned").exists():
            raise AssertionError(f"{case.bad_input}: code ran while loading") from error
        return error
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError(f"{case.entry} accepted {case.bad_input}")


def message(error: BaseException) -> str:
    text = error.message
    return text[1:-1] if isinstance(error, KeyError) and text.startswith(("'", '"')) else text


def table() -> str:
    rows = ["| entry point | bad input | error |", "|---|---|---|"]
    for case in CASES:
        error = run(case)
        text = " ".join(message(error).split()).replace("|", "\\|")
        rows.append(f"| {case.entry} | {case.bad_input} | `{type(error).__name__}`: {text} |")
    return "\n".join(rows)


def document() -> str:
    return (
        "# Bad inputs and the errors they give\n\n"
        "Every public entry point, tried with bad inputs; each row is a test (`tests/test_bad_inputs.py`), and "
        "the table is generated from the same list (`python tests/bad_inputs.py` rewrites it; a test fails "
        "when they differ). Messages say what was expected and what was given. `<dir>` stands for the folder "
        "the test used, `<repo>` for the source checkout. Property-based tests (`tests/test_properties.py`) allow "
        "only these errors.\n\n"
        + table() + "\n"
    )


def templates() -> list[tuple[str, re.Pattern[str]]]:
    """(error type name, message pattern) of every documented row: numbers, dtypes, quoted values and the
    scratch folder may vary."""
    patterns = []
    for line in DOC.read_text().splitlines():
        found = re.fullmatch(r"\| .* \| .* \| `(\w+)`: (.*) \|", line)
        if not found:
            continue
        text = found.group(2).replace("\\|", "|")
        pattern = re.escape(text)
        pattern = re.sub(r"torch\\\.\w+", r"torch\\.\\w+", pattern)
        pattern = re.sub(r"'[^']*'", "'[^']*'", pattern)
        pattern = re.sub(r"-?(\d+(\\\.\d+)?(e[-+]?\d+)?|nan|inf)", r"[-+.\\deainf]+", pattern)
        patterns.append((found.group(1), re.compile(pattern.replace("<dir>", ".*").replace("<repo>", ".*"))))
    return patterns


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(document())
    print(f"wrote {DOC} ({len(CASES)} rows)")
