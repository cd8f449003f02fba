"""The relevance module: patch features -> three ways of knowing -> relevance field -> allocator.

    image, patch tokens --> features (tokens + texture stack, standardised)
        propositional (entropy), perspectival (Hebbian attention), participatory (query coupling)
        --> evidence (B, N, 3) --> allocator (a per-patch logit)
        --> relevance field: balanced evidence + allocation, with learned lateral structure, relaxed to
        equilibrium --> budget logits (B, N); the top K patches get tokens.

Every sub-network has its own learning rule (see ``SUBNETWORKS`` and ``DEFAULT_RULES``); the
backbone is only read, never trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from arrcoc.backbones.tokens import DROPPED_MODES
from arrcoc.budget import Budget, check_budget
from arrcoc.config import apply_override, from_mapping, load_yaml_mapping
from arrcoc.rules.distributed import ShardedBatchNorm1d
from arrcoc.rules.relaxation import relax, relax_differentiably

from .allocator import Allocator
from .field import EVIDENCE, FieldRelaxation, RelevanceField, grid_distances, grid_positions
from .knowing import ParticipatoryKnowing, PerspectivalKnowing, standardize_per_image
from .texture import NUM_FEATURES, TextureImage, patch_entropy, texture_features, texture_image

# Sub-networks and the rules that suit them (any of them may also be `frozen`; those with a target
# may be `backprop`, i.e. autograd inside that sub-network only).
SUBNETWORKS = {
    "perspectival_encoder": "label-free: hebbian-oja, hebbian-bcm",
    "perspectival_readout": "to the relevance target: contrastive-hebbian, backprop, fa",
    "participatory": "query-patch coupling: infonce-hebbian, contrastive-hebbian (participatory_contrast: patches), "
                     "backprop",
    "field": "energy over patches: ep, chl",
    "allocator": "budget logits: fa, dfa, backprop",
}
# the perspectival encoder is a fixed random projection: its Hebbian rule (hebbian-oja, form sanger) stays for
# ablation; it beat its random start by less than 2 points everywhere (docs/decisions.md, issue 36)
DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "perspectival_encoder": {"name": "frozen"},
    "perspectival_readout": {"name": "contrastive-hebbian"},
    "participatory": {"name": "infonce-hebbian", "temperature": 0.1},
    "field": {"name": "ep", "loss": "mse", "beta": 0.5, "nudge": "symmetric"},
    "allocator": {"name": "fa"},
}
TARGETS = ("attention", "perturbation", "box", "reward", "set")
PARTICIPATORY_CONTRASTS = ("batch", "patches")


@dataclass
class Ablations:
    """Switches that exist only to take a piece of the design out and measure what it gave (``ablate:`` in YAML,
    ``config.ablate.field``); the design has every piece on."""

    backbone_tokens: bool = True  # the backbone's patch embeddings among the patch features
    texture: bool = True  # the texture stack among the patch features
    propositional: bool = True  # the three ways of knowing, each in the evidence (off: zeros)
    perspectival: bool = True
    participatory: bool = True
    field: bool = True  # off: the budget logits are the drive at the field's initial weights, no lateral terms
    adaptive_balance: bool = True  # off: the field weighs the evidence alike for every query
    kept_set: bool = True  # the field and allocator learn the target's kept set at the budget (off: the target)

    def __post_init__(self) -> None:
        odd = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if not isinstance(getattr(self, f.name), bool)}
        if odd:
            raise ValueError(f"ablate switches are true or false, got {odd}")
        if not (self.backbone_tokens or self.texture):
            raise ValueError("the relevance module needs patch features: keep ablate.backbone_tokens or "
                             "ablate.texture on")


# keys of the flat config before the ablation switches moved under `ablate`, and the probes that were removed:
# docs/decisions.md has their numbers
MOVED_TO_ABLATE = tuple(f.name for f in dataclasses.fields(Ablations))
REMOVED = {"propositional_measure": "entropy", "allocator_features": False,  # key: the value the design kept
           "neighbourhood": 0, "allocator_evidence": True}


@dataclass
class RelevanceConfig:
    budget: Budget = 0.25  # a ratio of the patch tokens in (0, 1] or a token count (arrcoc.budget)
    dropped: str = "discard"  # what becomes of dropped tokens: discard | fuse (EViT) | merge (ToMe)
    # tiers of detail instead of plain top-K: 2x2-patch regions merged (1 token), normal (4) or refined
    # (16, from a 2x view); the `refined_regions` best regions are refined, the total stays within budget
    tiers: bool = False
    refined_regions: int = 0
    # What the participatory coupling learns to tell apart: "batch" (an image's queried content from the other
    # images' queries: InfoNCE with batch negatives, rule infonce-hebbian) or "patches" (the queried patches from
    # the other patches of the same image: softmax over the patches; rule contrastive-hebbian or backprop with mse)
    participatory_contrast: str = "batch"
    # sizes
    query_dim: int = 384
    perspectival_units: int = 16
    # divide each perspectival unit's drive by its spread over the image (divisive normalisation; docs/decisions.md)
    perspectival_gain_control: bool = False
    allocator_hidden: int = 32
    relaxation: FieldRelaxation = dataclasses.field(default_factory=FieldRelaxation)  # how the field relaxes
    # learning
    target: str = "attention"  # attention | perturbation | box | reward (see arrcoc.relevance.targets)
    rules: dict[str, Any] = dataclasses.field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_RULES.items()})
    optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "adam", "lr": 1e-3})
    # pixels: images given to the backbone are (rgb - mean) / std; the texture stack needs rgb in [0, 1]
    pixel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ablate: Ablations = dataclasses.field(default_factory=Ablations)  # switches for ablations only

    def __post_init__(self) -> None:
        if isinstance(self.relaxation, dict):
            self.relaxation = FieldRelaxation.from_dict(self.relaxation)
        if isinstance(self.ablate, dict):
            self.ablate = from_mapping(Ablations, self.ablate, "ablate switch")
        check_budget(self.budget)
        if self.dropped not in DROPPED_MODES:
            raise ValueError(f"dropped must be one of {DROPPED_MODES}, got {self.dropped!r}")
        if self.refined_regions < 0:
            raise ValueError(f"refined_regions must be >= 0, got {self.refined_regions}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        unknown = sorted(set(self.rules) - set(SUBNETWORKS))
        if unknown:
            raise KeyError(f"rules given for unknown sub-networks {unknown}; sub-networks: {sorted(SUBNETWORKS)}")
        for subnetwork, rule in self.rules.items():
            if not (isinstance(rule, dict) and isinstance(rule.get("name"), str)):
                raise ValueError(f"rules.{subnetwork} must be a mapping with a rule 'name' "
                                 f"({SUBNETWORKS[subnetwork]}), got {rule!r}")
        self.rules = {**{k: dict(v) for k, v in DEFAULT_RULES.items()}, **self.rules}
        if self.participatory_contrast not in PARTICIPATORY_CONTRASTS:
            raise ValueError(f"participatory_contrast must be one of {PARTICIPATORY_CONTRASTS}, "
                             f"got {self.participatory_contrast!r}")
        if self.participatory_contrast == "patches" and self.rules["participatory"]["name"] == "infonce-hebbian":
            raise ValueError("participatory_contrast 'patches' gives the participatory rule a clamped output to move "
                             "towards: use rules.participatory {name: contrastive-hebbian} (or {name: backprop, "
                             "loss: mse}); infonce-hebbian contrasts the batch")
        for name in ("pixel_mean", "pixel_std"):  # JSON and YAML give lists: one config, one value
            values = getattr(self, name)
            if not (isinstance(values, list | tuple) and len(values) == 3):
                raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}")
            setattr(self, name, tuple(float(v) for v in values))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RelevanceConfig:
        moved = sorted(set(data) & set(MOVED_TO_ABLATE))
        if moved:
            raise KeyError(f"relevance config key(s) {moved} are ablation switches now: write them under ablate "
                           f"(YAML `ablate: {{{moved[0]}: false}}`, override `ablate.{moved[0]}`)")
        removed = sorted(set(data) & set(REMOVED))
        if removed:
            kept = ", ".join(f"{key}: {REMOVED[key]!r}" for key in removed)
            raise KeyError(f"relevance config key(s) {removed} were removed "
                           f"(docs/decisions.md says why); the design keeps {kept}")
        return from_mapping(cls, data, "relevance config")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
                  budget: Budget | None = None) -> RelevanceConfig:
        """The config in a YAML file (its ``relevance:`` mapping, or the whole file), read with ``yaml.safe_load``
        (no Python object is ever constructed).

        Args:
            path: the YAML file (as given, else relative to the source checkout).
            overrides: dotted keys and values applied on top, e.g. ``{"rules.allocator": {"name": "backprop"}}``.
            budget: replaces the file's budget if given.

        Returns:
            The validated config; unknown keys raise ``KeyError`` naming the known ones.
        """
        data = load_yaml_mapping(path, what="relevance config")
        data = dict(data.get("relevance", data))
        for dotted, value in (overrides.items() if isinstance(overrides, Mapping) else overrides):
            apply_override(data, dotted, value)
        if budget is not None:
            data["budget"] = budget
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RelevanceOutput:
    """Everything one pass computed; the trainer feeds its pieces to the sub-networks' rules."""

    logits: Tensor  # (B, N) budget logits, the field's equilibrium r: the top K get tokens
    allocation: Tensor  # (B, N) the allocator's own per-patch logits, part of the field's drive
    relevance: Tensor  # (B, N) equilibrium relevance sigmoid(r) in (0, 1)
    evidence: Tensor  # (B, N, 3) propositional, perspectival, participatory (standardised per image)
    features: Tensor  # (B, N, F) standardised patch features
    context: Tensor  # (B, N, F) features minus their image mean (centre-surround)
    positions: Tensor  # (1, N, 2) the patches' places on the grid (in patches)
    query: Tensor | None


class RelevanceModule(nn.Module):
    def __init__(self, config: RelevanceConfig, token_dim: int, patch_size: tuple[int, int]):
        super().__init__()
        self.config, self.patch_size = config, patch_size
        ablate = config.ablate
        feature_dim = (token_dim if ablate.backbone_tokens else 0) + (NUM_FEATURES if ablate.texture else 0)
        # statistics of the whole batch, also when it is sharded over processes (torchrun). Inference uses the
        # cumulative average over every training batch (momentum None): an exponential average forgets its
        # initial variance of 1 too slowly for features that vary far less (docs/decisions.md)
        self.feature_norm = ShardedBatchNorm1d(feature_dim, affine=False, momentum=None)
        self.perspectival = PerspectivalKnowing(feature_dim, config.perspectival_units,
                                                config.perspectival_gain_control)
        temperature = config.rules["participatory"].get("temperature", 0.1)
        self.participatory = ParticipatoryKnowing(config.query_dim, feature_dim, temperature)
        self.field = RelevanceField(config.query_dim, config.budget, ablate.adaptive_balance)
        self.allocator = Allocator(EVIDENCE, config.allocator_hidden)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1))

    def subnetworks(self) -> dict[str, nn.Module]:
        return {
            "perspectival_encoder": self.perspectival.encoder,
            "perspectival_readout": self.perspectival.readout,
            "participatory": self.participatory.query_map,
            "field": self.field,
            "allocator": self.allocator.net,
        }

    def patch_features(self, images: Tensor, patch_tokens: Tensor) -> tuple[Tensor, TextureImage | None]:
        """(B, N, F) standardised features, and the images at texture resolution (RGB and CIE-Lab) when the
        texture stack or propositional knowing needs them (converted once: the conversion is a large share of
        the cost)."""
        dtype, ablate = self.pixel_std.dtype, self.config.ablate  # the module's own (float32 unless converted)
        texture = (texture_image(as_dtype(images, dtype), self.patch_size, self.pixel_mean, self.pixel_std)
                   if ablate.texture or ablate.propositional else None)
        parts = []
        if ablate.backbone_tokens:
            parts.append(as_dtype(patch_tokens, dtype))
        if ablate.texture:
            parts.append(texture_features(texture))
        raw = torch.cat(parts, -1)
        b, n, f = raw.shape
        return self.feature_norm(raw.reshape(b * n, f)).reshape(b, n, f), texture

    def evidence(self, texture: TextureImage | None, context: Tensor, query: Tensor | None) -> Tensor:
        """(B, N, 3) propositional, perspectival and participatory evidence, each standardised over the image's
        patches (zero where a way of knowing is ablated, and participatory without a query)."""
        ablate = self.config.ablate
        zeros = context.new_zeros(context.shape[:2])
        raw = torch.stack([
            patch_entropy(texture.lab[:, :1], texture.samples_per_patch) if ablate.propositional else zeros,
            self.perspectival(context) if ablate.perspectival else zeros,
            self.participatory(context, query) if ablate.participatory and query is not None else zeros,
        ], -1)
        return standardize_per_image(raw, dim=1)

    def relax_field(self, evidence: Tensor, allocation: Tensor, positions: Tensor, query: Tensor | None,
                    grid: tuple[int, int]) -> Tensor:
        """(B, N) the field's equilibrium logits r: at inference (eval mode, no autograd) after a fixed number of
        steps (:meth:`RelevanceField.equilibrium`); wherever the module learns the monitored relaxation, which
        reports a divergence instead of passing it on; under autograd (the backprop references) differentiated
        through it."""
        how = self.config.relaxation
        if how.inference_steps and not self.training and not torch.is_grad_enabled():
            distance2 = grid_distances(*grid, evidence.device, evidence.dtype)
            return self.field.equilibrium(evidence, allocation, query, distance2, how.inference_steps,
                                          how.inference_step_size)
        relaxed = relax_differentiably if torch.is_grad_enabled() else relax
        states, _ = relaxed(self.field.as_energy(), RelevanceField.pack(evidence, allocation, positions, query),
                            how=how)
        return states[0]

    def forward(self, images: Tensor, patch_tokens: Tensor, grid: tuple[int, int], query: Tensor | None = None
                ) -> RelevanceOutput:
        # the small module keeps its own precision under autocast, where the backbone and a text encoder may run in
        # reduced precision: its relaxation and its rules' updates need it. Its inputs are cast to its dtype (the
        # images and tokens in patch_features).
        with torch.autocast(images.device.type, enabled=False):
            query = None if query is None else as_dtype(query, self.pixel_std.dtype)
            return self._forward(images, patch_tokens, grid, query)

    def _forward(self, images: Tensor, patch_tokens: Tensor, grid: tuple[int, int], query: Tensor | None
                 ) -> RelevanceOutput:
        features, texture = self.patch_features(images, patch_tokens)
        context = features - features.mean(1, keepdim=True)
        evidence = self.evidence(texture, context, query)
        positions = grid_positions(*grid, device=images.device)
        allocation = self.allocator(evidence)
        if self.config.ablate.field:
            logits = self.relax_field(evidence, allocation, positions, query, grid)
        else:
            logits = evidence @ self.field.evidence_weight.detach() + allocation
        return RelevanceOutput(logits, allocation, torch.sigmoid(logits), evidence, features, context, positions,
                               query)


def as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, without an operation where it is already (one fewer launch per call on a GPU)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
