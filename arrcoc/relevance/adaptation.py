"""Label-free online adaptation of an attached model's relevance module: bounded updates, rollback, probe.

``model.adapt(images)`` is one step of the model's :class:`OnlineAdaptation`: it learns towards a
self-supervised, forward-only target (perturbation importance, the set-level signal, ...), undoes
learning that lowers the running agreement of the reduced with the full-token predictions, and, with a
clean probe (``model.set_probe``), keeps an update only if the probe shows that the module has lost at most a
tenth of a point of the frozen module's (soft) agreement there, however long the stream. Why each default is
what it is: ``docs/decisions.md``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from arrcoc.optim import optimizer_class
from arrcoc.rules import NonFiniteUpdate
from arrcoc.rules.relaxation import RelaxationDiverged

from .wrapper import QueryInput

DEFAULT_ADAPTATION_LR = {"sgd": 0.05, "adam": 3e-3}  # per optimizer in arrcoc.optim.OPTIMIZERS
ADAPTATION_TARGETS = ("perturbation", "attention", "set", "reward")


@dataclass
class AdaptationConfig:
    """How ``adapt()`` learns online.

    Args:
        optimizer: ``sgd`` (each update moves the weights by at most ``lr * max_grad_norm``: the bound the
            reliability benchmark verifies) or ``adam`` (each weight moves at most about 3.2 ``lr`` per update;
            its moments live across calls and restart after a rollback or probe rejection).
        lr: step size; ``None``: the optimizer's default (sgd 0.05, adam 3e-3).
        max_grad_norm: gradients are clipped to this norm before the step.
        proxy_momentum: of the running agreement of the reduced with the full-token prediction.
        rollback_drop: roll back when the running agreement falls this far below its best.
        target: the self-supervised target, ``perturbation`` (reduced forwards with patch groups dropped),
            ``attention`` (the backbone's CLS attention: one forward), ``set`` (the set-level signal: does each
            kept patch, and each next candidate, move the reduced prediction towards the full-token one; 1 + 2K
            forwards of about K tokens) or ``reward`` (does the module's choice agree with the full-token prediction).
        probe_max_drop: with a probe, how much of the frozen module's soft agreement on it (the mean probability
            the reduced prediction gives the full-token class; 0.001: a tenth of a point) the adapting module may
            have lost, counted from the frozen module (not from the previous update) however long the stream.
        probe_confidence: z of the one-sided test on the probe (1.64: 95%); see :meth:`OnlineAdaptation.step`.
        probe_chunk: probe images per forward pass.
        every: update on every ``every``-th call only; the calls between cost nothing (the model's forward is the
            caller's).
        images_per_update: learn on at most this many images of each call's batch (its first ones), the target's
            reduced forwards included; ``None``: all of them.
    """

    optimizer: str = "sgd"
    lr: float | None = None
    max_grad_norm: float = 1.0
    proxy_momentum: float = 0.9
    rollback_drop: float = 0.15
    target: str = "set"
    probe_max_drop: float = 0.001
    probe_confidence: float = 1.64
    probe_chunk: int = 64
    every: int = 1
    images_per_update: int | None = None

    def __post_init__(self) -> None:
        if self.target not in ADAPTATION_TARGETS:
            raise ValueError(f"adaptation target must be one of {ADAPTATION_TARGETS}, got {self.target!r}")
        if self.optimizer not in DEFAULT_ADAPTATION_LR:
            raise ValueError(f"adaptation optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_ADAPTATION_LR[self.optimizer]
        if self.every < 1 or (self.images_per_update is not None and self.images_per_update < 1):
            raise ValueError(f"adaptation needs every >= 1 and images_per_update >= 1 (or None), got "
                             f"every={self.every}, images_per_update={self.images_per_update}")
        if not self.lr >= 0 or not self.max_grad_norm > 0:
            raise ValueError(f"adaptation needs lr >= 0 and max_grad_norm > 0, got lr={self.lr}, "
                             f"max_grad_norm={self.max_grad_norm}")
        if not self.probe_confidence >= 0 or not 0 <= self.probe_max_drop < 1:
            raise ValueError(f"adaptation needs probe_confidence >= 0 and 0 <= probe_max_drop < 1, got "
                             f"probe_confidence={self.probe_confidence}, probe_max_drop={self.probe_max_drop}")


@dataclass
class AdaptReport:
    agreement: float | None  # fraction of images whose reduced prediction equals the full-token one (None: no update)
    running_agreement: float | None
    snapshot: bool  # the weights this call started from became the rollback point
    rolled_back: bool  # the weights were restored to the rollback point (and not updated)
    probe_agreement: float | None = None  # on the clean probe after this call (None: no probe set)
    probe_rejected: bool = False  # this call's update lowered the probe agreement too far and was undone
    skipped: str | None = None  # why no update was made (a diverging relaxation, a non-finite update)


@dataclass
class _Probe:
    images: Tensor
    query: Tensor | None
    full: Tensor  # (n,) full-token predictions (the backbone is frozen: computed once)
    frozen_soft: Tensor | None = None  # (n,) the probability the module gave them when the probe was set


class AdaptableModel(Protocol):
    """What :class:`OnlineAdaptation` uses of the model it adapts, :class:`~arrcoc.relevance.attach.ARRCOC`
    (described here rather than imported: attach.py imports this module)."""

    adaptation: AdaptationConfig
    relevance: nn.Module  # the weights adaptation learns, snapshots and restores
    adapter: nn.Module  # the frozen backbone: images -> its full-token output

    def __call__(self, images: Tensor, query: QueryInput = None) -> Tensor: ...

    def agreement(self, images: Tensor, query: QueryInput = None) -> Tensor: ...

    def learn(self, images: Tensor, query: QueryInput = None, target: Tensor | str | None = None, *,
              optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float | None = None
              ) -> dict[str, float]: ...

    def check_images(self, images: Tensor) -> None: ...

    def encode_query(self, query: QueryInput, batch: int) -> Tensor | None: ...


class OnlineAdaptation:
    """The online-adaptation state of one attached model (its settings: ``model.adaptation``)."""

    def __init__(self, model: AdaptableModel):
        self.model = model
        self.running_agreement: float | None = None
        self.best_agreement = 0.0
        self.last_good: dict[str, Tensor] | None = None
        self._optimizer: tuple[AdaptationConfig, torch.optim.Optimizer] | None = None
        self.probe: _Probe | None = None
        self.probe_accepted: tuple[dict[str, Tensor], Tensor] | None = None  # weights that passed, their agreement
        self.calls = 0

    @property
    def config(self) -> AdaptationConfig:
        return self.model.adaptation

    def _weights(self) -> dict[str, Tensor]:
        return copy.deepcopy(self.model.relevance.state_dict())

    def _restore(self, weights: dict[str, Tensor]) -> None:
        self.model.relevance.load_state_dict(weights)
        self._optimizer = None  # the moments led here: start them afresh

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of online updates: one per ``AdaptationConfig`` object (Adam's moments carry across
        calls; assigning a new config starts afresh), its step size following ``adaptation.lr``."""
        cfg = self.config
        if self._optimizer is None or self._optimizer[0] is not cfg:
            self._optimizer = cfg, optimizer_class(cfg.optimizer)(self.model.relevance.parameters(), lr=cfg.lr)
        optimizer = self._optimizer[1]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        return optimizer

    def step(self, images: Tensor, query: QueryInput = None) -> AdaptReport:
        """One label-free step on ``images``; see :meth:`ARRCOC.adapt`.

        With a probe, let d be, per probe image, the probability the reduced prediction gives the full-token
        class now minus what the frozen module gave it (paired: the soft agreement, which sees a drift long
        before it flips a top class). The update is kept only if ``mean(d) - z * std(d) / sqrt(n) >=
        -probe_max_drop`` with ``z = probe_confidence``: a one-sided non-inferiority test against the frozen
        module, so the allowance is for the whole stream, not for each update. An update that barely moves the
        probe's predictions is kept (its small spread bounds its loss tightly); one that moves them more must
        show a gain.
        """
        cfg, model = self.config, self.model
        self.calls += 1
        if (self.calls - 1) % cfg.every:
            last = self.running_agreement
            return AdaptReport(last, last, False, False, skipped=f"updates every {cfg.every} calls")
        if cfg.images_per_update is not None:
            images = images[:cfg.images_per_update]
            query = query if query is None or isinstance(query, str) else query[:cfg.images_per_update]
        with torch.no_grad():
            agreement = model.agreement(images, query).mean().item()
            m = cfg.proxy_momentum
            running = agreement if self.running_agreement is None else m * self.running_agreement + (1 - m) * agreement
            self.running_agreement = running
            rolled_back = snapshot = False
            if running >= self.best_agreement or self.last_good is None:
                self.best_agreement = max(self.best_agreement, running)
                self.last_good, snapshot = self._weights(), True
            elif running < self.best_agreement - cfg.rollback_drop:
                self._restore(self.last_good)
                self.running_agreement, rolled_back = self.best_agreement, True
        report = AdaptReport(agreement, self.running_agreement, snapshot, rolled_back)
        if not rolled_back:
            try:
                model.learn(images, query, target=cfg.target, optimizer=self.optimizer, max_grad_norm=cfg.max_grad_norm)
            except (RelaxationDiverged, NonFiniteUpdate) as error:  # nothing changed (fill_grads is all or nothing)
                report.skipped = str(error)
        if self.probe is not None:
            self._probe_test(report)
        return report

    def _probe_test(self, report: AdaptReport) -> None:
        """Keep the weights if they pass the probe's test (:meth:`step`), else restore the last that passed."""
        cfg, probe = self.config, self.probe
        soft, agreement = self._probe_agreement()
        change = soft - probe.frozen_soft
        standard_error = change.std().item() / math.sqrt(len(change))
        lower = change.mean().item() - cfg.probe_confidence * standard_error
        if not lower >= -cfg.probe_max_drop:  # (a probe of one image has no spread: nan, rejected)
            weights, agreement = self.probe_accepted
            self._restore(weights)
            report.probe_rejected = True
        else:  # every weight state that serves has passed the probe
            self.probe_accepted = self._weights(), agreement
        report.probe_agreement = agreement

    def set_probe(self, images: Tensor, query: QueryInput = None) -> float:
        """See :meth:`ARRCOC.set_probe`."""
        model = self.model
        model.check_images(images)
        q = model.encode_query(query, images.shape[0])
        chunk = self.config.probe_chunk
        with torch.no_grad():
            full = torch.cat([model.adapter(images[i:i + chunk]).argmax(-1) for i in range(0, len(images), chunk)])
        self.probe = _Probe(images, q, full)
        self.probe.frozen_soft, reference = self._probe_agreement()
        self.probe_accepted = self._weights(), reference
        return reference

    @torch.no_grad()
    def _probe_agreement(self) -> tuple[Tensor, float]:
        """Per probe image, the probability the prediction at the budget gives its full-token class (the soft
        agreement), and the share of the probe whose top class it is (the agreement)."""
        probe, chunk = self.probe, self.config.probe_chunk
        probabilities = torch.cat([
            self.model(probe.images[i:i + chunk], None if probe.query is None else probe.query[i:i + chunk])
            .float().softmax(-1) for i in range(0, len(probe.images), chunk)])
        soft = probabilities.gather(1, probe.full[:, None]).squeeze(1)
        return soft, (probabilities.argmax(-1) == probe.full).float().mean().item()
