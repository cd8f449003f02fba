"""What every ARR-COC wrapper shares (``ARRCOC`` for ViTs, ``VLMARRCOC`` for vision-language models): the relevance
module's local rules and their optimizer, the budget, query encoding and checkpoints.

A wrapper owns ``config`` (:class:`RelevanceConfig`) and ``relevance`` (:class:`RelevanceModule`); this mixin builds
one rule per sub-network and the optimizer from the config, applies one step of every rule to a pass of the module,
and reads and writes the module's checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from arrcoc.budget import Budget, num_kept
from arrcoc.optim import optimizer_class
from arrcoc.rules import RuleContext, build_rule

from .checkpoint import write_checkpoint
from .field import RelevanceField, nudged_error
from .graphs import GraphedForward
from .knowing import ParticipatoryKnowing
from .module import DEFAULT_RULES, RelevanceConfig, RelevanceModule, RelevanceOutput
from .targets import kept_set

QueryInput = Tensor | str | Sequence[str] | None


def check_finite(name: str, values: Tensor) -> None:
    if values.numel() == 0 or not values.is_floating_point():
        return
    # the extremes in one pass (NaN propagates into both): isfinite allocates temporaries larger than the input
    low, high = torch.aminmax(values.detach())
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        finite = torch.isfinite(values)
        nan = int(torch.isnan(values).sum())
        raise ValueError(f"{name} must be finite, got {nan} NaN and {int((~finite).sum()) - nan} infinite values")


class RelevanceWrapper:
    config: RelevanceConfig
    relevance: RelevanceModule
    rules: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    text_encoder: Callable[[list[str]], Tensor] | None
    adapter: Any  # the frozen backbone's adapter (``.model``: the backbone)
    # Whether the images and query embeddings are checked for NaN and Inf: True, False, or None (the default): where
    # they are on the CPU. On an accelerator the check reads a flag back from the device, a host sync that stalls
    # its queue of kernels (and under torch.compile a graph break); unchecked, bad values flow into the output as
    # they do through the unmodified model.
    check_values: bool | None = None

    def check_finite(self, name: str, values: Tensor) -> None:
        """:func:`check_finite` where :attr:`check_values` asks for it (never while compiling)."""
        wanted = values.device.type == "cpu" if self.check_values is None else self.check_values
        if wanted and not torch.compiler.is_compiling():
            check_finite(name, values)

    # ---- checkpoints (each wrapper's from_pretrained reads them back) ----------------------------------
    def checkpoint_config(self) -> dict[str, Any]:
        """What ``config.json`` records to rebuild this wrapper (the relevance config; the VLM wrapper adds its own)."""
        return self.config.to_dict()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The relevance module's and rules' weights (safetensors) + ``config.json`` (config, backbone, schema
        version, checksum), crash-safe: see :mod:`arrcoc.relevance.checkpoint`."""
        tensors = {f"relevance.{k}": v for k, v in self.relevance.state_dict().items()}
        tensors.update({f"rules.{k}": v for k, v in self.rules.state_dict().items()})
        write_checkpoint(directory, tensors,
                         {"config": self.checkpoint_config(), "backbone": type(self.adapter.model).__name__})

    def load_checkpoint_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any],
                                source: str | os.PathLike) -> None:
        """Load what :func:`~arrcoc.relevance.checkpoint.read_checkpoint` read into the relevance module and rules."""
        for prefix, module in (("relevance.", self.relevance), ("rules.", self.rules)):
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(
                    f"checkpoint {source} does not fit this backbone ({type(self.adapter.model).__name__}; it was "
                    f"saved for {meta.get('backbone')}): {err}"
                ) from err

    def encode_query(self, query: QueryInput, batch: int) -> Tensor | None:
        """(batch, query_dim) query embeddings from embeddings, one string or a list of strings (through the
        text encoder); None stays None."""
        if query is None:
            return None
        if isinstance(query, str):
            query = [query] * batch
        if not isinstance(query, Tensor | list | tuple):
            raise TypeError(f"query must be a (batch, {self.config.query_dim}) tensor of embeddings, a string or a "
                            f"list of strings, got {type(query).__name__}")
        if not isinstance(query, Tensor):
            if self.text_encoder is None:
                raise ValueError("a text query needs a text encoder: attach(..., text_encoder=...) or pass embeddings")
            query = self.text_encoder(list(query))
        if query.ndim != 2 or query.shape[-1] != self.config.query_dim:
            raise ValueError(f"query embeddings must be (batch, {self.config.query_dim}), got {tuple(query.shape)}")
        if query.shape[0] != batch:
            raise ValueError(f"{query.shape[0]} queries for {batch} images: give one query per image")
        if not query.is_floating_point():
            raise TypeError(f"query embeddings must be floating point, got {query.dtype}")
        self.check_finite("query embeddings", query)
        return query

    # ---- the graph-captured inference forward (each wrapper sets ``graphs`` and ``_graphed = None``) ---------
    def graph_target(self) -> Callable[..., Tensor]:
        """The inference forward that :attr:`graphed` compiles whole (no host sync, no data-dependent branch)."""
        raise NotImplementedError

    @property
    def graphed(self) -> GraphedForward:
        """:meth:`graph_target` compiled whole and graph-captured (made at its first use)."""
        if self._graphed is None:
            self._graphed = GraphedForward(self.graph_target())
        return self._graphed

    def graphs_wanted(self, inputs: Tensor) -> bool:
        """Whether inference on ``inputs`` runs :attr:`graphed`: as :attr:`graphs` says (default: on CUDA), without
        autograd, and not inside a ``torch.compile`` of the caller's own."""
        wanted = inputs.device.type == "cuda" if self.graphs is None else self.graphs
        return wanted and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    # ---- the budget ----------------------------------------------------------------------------------
    @property
    def budget(self) -> Budget:
        """The token budget: a ratio in (0, 1] or a count (:mod:`arrcoc.budget`); assigning one applies it
        like :meth:`set_budget`."""
        return self.config.budget

    @budget.setter
    def budget(self, budget: Budget) -> None:
        self.set_budget(budget)

    def set_budget(self, budget: Budget):
        """Keep a different share of the tokens from now on, without retraining: the field's competition term pulls
        its total relevance towards the new K; its ranking is the one it learned for the training budget's kept set
        (what that costs at other budgets: the canvas benchmark's tables).

        Args:
            budget: a ratio in (0, 1] or a token count (validated: a bad one raises and changes nothing).

        Returns:
            The wrapper itself, so that ``model.set_budget(0.5)(images)`` reads as one call.
        """
        if type(budget) is type(self.config.budget) and budget == self.config.budget:
            return self  # unchanged: no config to rebuild (a caller may set it before every call)
        self.config = dataclasses.replace(self.config, budget=budget)  # validates
        self.relevance.config = self.config
        self.relevance.field.budget = budget
        return self

    def keeps_all(self, num_patches: int) -> bool:
        """Whether the budget keeps all ``num_patches`` tokens: the wrapped model then runs unmodified."""
        return num_kept(self.budget, num_patches) == num_patches

    def _build_rules(self) -> None:
        """One rule per sub-network, as configured, and the optimizer that applies their updates."""
        self.rules = nn.ModuleDict({
            name: build_rule(self._rule_config(name), subnet) for name, subnet in self.relevance.subnetworks().items()
        })
        self.optimizer = self._make_optimizer(self.config.optimizer)

    def _rule_config(self, name: str) -> dict[str, Any]:
        rule = dict(self.config.rules[name])
        if name == "field" and rule["name"] in ("ep", "chl"):  # the field relaxes the same way everywhere
            for key, value in self.config.relaxation.settings().items():
                rule.setdefault(key, value)
        return rule

    def _make_optimizer(self, spec: dict[str, Any]) -> torch.optim.Optimizer:
        """The optimizer that applies every rule's update: ``lr`` for all sub-networks, except those named in
        ``subnetwork_lr`` (e.g. ``{field: 0.03}``: the field's energy parameters learn slowly by EP)."""
        kind = optimizer_class(spec.get("name"))
        known = ["lr", "name", "subnetwork_lr"]
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise KeyError(f"unknown optimizer key(s) {unknown}; known: {known}")
        own_lr = dict(spec.get("subnetwork_lr") or {})
        subnetworks = self.relevance.subnetworks()
        strangers = sorted(set(own_lr) - set(subnetworks))
        if strangers:
            raise KeyError(f"optimizer.subnetwork_lr names unknown sub-network(s) {strangers}; "
                           f"sub-networks: {sorted(subnetworks)}")
        groups = [{"params": list(subnetworks[name].parameters()), "lr": float(lr)} for name, lr in own_lr.items()]
        grouped = {id(p) for group in groups for p in group["params"]}
        rest = [p for p in self.relevance.parameters() if id(p) not in grouped]
        return kind([{"params": rest}, *groups], lr=float(spec.get("lr", 1e-3)))

    def _field_beta(self) -> float:
        """The nudge the allocator's error is measured with: the field rule's beta (an energy rule's), else its
        default."""
        return float(self.config.rules["field"].get("beta", DEFAULT_RULES["field"]["beta"]))

    def ranking_target(self, out: RelevanceOutput, target: Tensor) -> Tensor:
        """(B, N) what the ranking (the field and the allocator) learns from the per-patch ``target``: its
        :func:`~arrcoc.relevance.targets.kept_set` at the budget (the target itself with ``ablate.kept_set`` off)."""
        if not self.config.ablate.kept_set:
            return target
        return kept_set(target, out.positions, num_kept(self.budget, target.shape[1]))

    def rule_contexts(self, out: RelevanceOutput, target: Tensor) -> dict[str, RuleContext]:
        """What each sub-network's rule sees in one step (only the sub-networks in use): the ways of knowing learn
        the per-patch ``target``, the ranking its :meth:`ranking_target`."""
        cfg, relevance = self.config, self.relevance
        contexts: dict[str, RuleContext] = {}
        if cfg.ablate.perspectival:
            modulated = cfg.rules["perspectival_encoder"].get("modulated", False)
            contexts["perspectival_encoder"] = RuleContext(out.context, target=target if modulated else None)
            responses = relevance.perspectival.responses(out.context)
            contexts["perspectival_readout"] = RuleContext(responses, target=target[..., None])
        if cfg.ablate.participatory and out.query is not None:
            if cfg.participatory_contrast == "patches":
                positive = relevance.participatory.clamped_output(out.context, out.query, target)
            else:  # the key the query should retrieve against the batch's other queries
                positive = ParticipatoryKnowing.queried_content(out.context, target)
            contexts["participatory"] = RuleContext(out.query, target=positive)
        ranking = self.ranking_target(out, target)
        if cfg.ablate.field:
            field_input = RelevanceField.pack(out.evidence, out.allocation, out.positions, out.query)
            contexts["field"] = RuleContext(field_input, target=ranking)
            error = nudged_error(relevance.field, field_input, out.logits, ranking, self._field_beta(),
                                 cfg.relaxation)
        else:  # d(binary cross-entropy)/d(logit), the nudged error without a field
            error = torch.sigmoid(out.logits) - ranking
        contexts["allocator"] = RuleContext(out.evidence, output_error=(error / target.shape[0])[..., None])
        return contexts

    def apply_rules(self, out: RelevanceOutput, target: Tensor, optimizer: torch.optim.Optimizer | None = None,
                    max_grad_norm: float | None = None) -> None:
        """Every sub-network's rule fills its .grad from ``out`` and ``target`` (B, N), then the optimizer steps.

        If any rule fails (a diverging relaxation, a non-finite update), every .grad is cleared and no
        weight changes; the error is raised.
        """
        self.apply_rules_over([(out, target)], optimizer, max_grad_norm)

    def apply_rules_over(self, passes: Sequence[tuple[RelevanceOutput, Tensor]],
                         optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float | None = None) -> None:
        """:meth:`fill_rule_grads` from several passes, then :meth:`step_optimizer`."""
        self.fill_rule_grads(passes)
        self.step_optimizer(optimizer, max_grad_norm)

    def fill_rule_grads(self, passes: Sequence[tuple[RelevanceOutput, Tensor]]) -> None:
        """Clear every .grad of the relevance module, then let each sub-network's rule fill its own; no weight
        changes (under torchrun the filled .grad is all-reduced before the optimizer steps).

        Several passes of the module over grids of different sizes (which cannot share a batch) make one
        update: each sub-network's update is the mean of its per-pass updates weighted by their images, and
        the participatory rule, whose negatives are the other queries of its batch, sees the queries and keys
        of all passes in one batch. If any rule fails (a diverging relaxation, a non-finite update), every
        .grad is cleared; the error is raised.
        """
        for out, target in passes:
            if target.shape != out.logits.shape:
                raise ValueError(f"target must be (batch, patches) = {tuple(out.logits.shape)}, "
                                 f"got {tuple(target.shape)}")
            if not bool(((target >= 0) & (target <= 1)).all()):  # also false for NaN
                raise ValueError(f"target must hold relevance values in [0, 1], got values in "
                                 f"[{target.min().item():.4g}, {target.max().item():.4g}]")
        self.relevance.zero_grad(set_to_none=True)
        total = sum(target.shape[0] for _, target in passes)
        parameters = list(self.relevance.parameters())
        several = len(passes) > 1
        try:
            # the small relevance module keeps its own precision under autocast (the contexts run parts of it, and
            # a target from a reduced-precision backbone meets float32 weights here): its relaxations need it
            with torch.autocast(passes[0][0].logits.device.type, enabled=False):
                contexts = [self.rule_contexts(out, target.to(out.logits.dtype)) for out, target in passes]
                joint = len(passes) > 1 and all("participatory" in c for c in contexts)
                for (_, target), pass_contexts in zip(passes, contexts):
                    before = [None if p.grad is None else p.grad.clone() for p in parameters] if several else []
                    for name, ctx in pass_contexts.items():
                        if not (joint and name == "participatory"):
                            self.rules[name].step(ctx)
                    for p, previous in zip(parameters, before):  # weight this pass's share of the update
                        if p.grad is not None:
                            base = torch.zeros_like(p.grad) if previous is None else previous
                            p.grad = base + (p.grad - base) * (target.shape[0] / total)
                if joint:
                    queries = torch.cat([c["participatory"].inputs for c in contexts])
                    keys = torch.cat([c["participatory"].target for c in contexts])
                    self.rules["participatory"].step(RuleContext(queries, target=keys))
        except Exception:
            self.relevance.zero_grad(set_to_none=True)
            raise

    def step_optimizer(self, optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float | None = None
                       ) -> None:
        """Apply the filled .grad (clipped to ``max_grad_norm`` if given) with ``optimizer`` (default: the
        module's own)."""
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.relevance.parameters(), max_grad_norm)
        (optimizer or self.optimizer).step()
