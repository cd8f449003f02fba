"""The canvas benchmark's settings (``configs/canvas_bench.yaml``), typed: read and checked once, with errors that
say what was expected and what was given, then handed whole to the worker processes (every class pickles)."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

from arrcoc.config import load_yaml_mapping
from arrcoc.data.tasks import TASKS
from arrcoc.relevance import AdaptationConfig

LAYOUT_SPLITS = {"query": "anywhere"}  # task -> its held-out layout's split


@dataclass(frozen=True)
class TrainSettings:
    """How each relevance module is trained.

    Args:
        steps: steps per task (the file may give one number for every task).
        global_steps: the DynamicViT-style allocator's steps per task (default: ``steps``).
        batch_size: canvases per step.
        max_grad_norm: gradients are clipped to this norm in every learning mode; ``None``: not clipped.
    """

    steps: dict[str, int]
    global_steps: dict[str, int]
    batch_size: int
    max_grad_norm: float | None = None


@dataclass(frozen=True)
class TaskSettings:
    """One task of the benchmark.

    Args:
        budget: the token fraction ARR-COC trains at and its ablations are scored at.
        relevance: dotted overrides of the base relevance config for this task.
        ablation_budgets: more token fractions the ablations are scored at.
        held_out_layout: token fractions at which every method is also scored on the task's held-out layout (the
            query canvases' ``anywhere`` split: digits anywhere, some beside another), with the modules trained on
            the usual layout; empty: not scored there.
    """

    budget: float
    relevance: dict[str, Any] = field(default_factory=dict)
    ablation_budgets: list[float] = field(default_factory=list)
    held_out_layout: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    """An ARR-COC ablation.

    Args:
        overrides: dotted overrides of each task's relevance config.
        tasks: the tasks it runs on; ``None``: every task of the run.
        seeds: it runs on this many of the run's lowest seeds; ``None``: on all of them.
    """

    overrides: dict[str, Any]
    tasks: list[str] | None = None
    seeds: int | None = None


@dataclass(frozen=True)
class HardRegime:
    """Where allocation decides: a task and a budget at which random-K falls far below all tokens."""

    task: str
    budget: float


@dataclass(frozen=True)
class ThroughputSettings:
    """Images/s of every method on ``batch`` cluttered canvases, medians of ``repeats`` interleaved repeats."""

    batch: int
    repeats: int


@dataclass(frozen=True)
class TrainingCostSettings:
    """Peak memory and median time of ``steps`` training steps on ``batch`` canvases, local rules vs. backprop."""

    batch: int
    steps: int


@dataclass(frozen=True)
class AdaptationSettings:
    """Online adaptation on the cluttered shift split.

    Args:
        stream_images: shift canvases in the stream, predicted and then adapted on, batch by batch.
        held_out: other shift canvases each adapted module is scored on afterwards.
        batch: canvases per step of the stream.
        budget: the token fraction the module adapts at.
        method: how ARR-COC adapts (every other key of the section).
        seeds: how many of the run's seeds' modules adapt (the first alone, as it is timed).
    """

    stream_images: int
    held_out: int
    batch: int
    budget: float
    method: AdaptationConfig
    seeds: int = 1


@dataclass(frozen=True)
class TargetThresholds:
    """The thresholds the report judges the targets by (a run records its own in ``canvas.json``).

    Args:
        query_of_oracle: on the query task, ARR-COC >= this share of the box oracle's accuracy.
        hard_margin: hard regime, at equal measured speed-up: ARR-COC >= the best baseline + this (points).
        hard_oracle_gap: hard regime: ARR-COC within this of the box oracle (points).
        regime_random_drop: the hard regime is one where random-K is at least this below all tokens (points) ...
        regime_oracle_gap: ... and the box oracle within this of all tokens (points).
        backprop_gap: local-rule ARR-COC >= all-backprop ARR-COC - this (points).
        memory_ratio: local-rule training's peak memory <= this times the end-to-end allocator's.
        time_ratio: local-rule training's step time <= this times the end-to-end allocator's.
        time_ratio_spread: a time ratio within this of its limit is called marginal (run-to-run spread).
        adaptation_recovery: online adaptation recovers >= this share of the accuracy lost to the shift ...
        adaptation_seeds: ... as a mean over at least this many seeds.
        adaptation_of_ceiling: online adaptation recovers >= this share of the label-free ceiling (what agreeing
            with the full-token prediction on every shift image would give back; per seed) ...
        adaptation_cost: ... at <= this times the frozen module's cost per image.
        module_share: the relevance module's cost <= this share of a full canvas-ViT forward.
        query_accuracy: on the query task at its budget, ARR-COC's mean accuracy >= this (the hand-set pooling it
            replaced reached 87.0, issue 36).
        field_cost: freezing the relevance field costs >= this on the query task and its held-out layout (points) ...
        field_cost_hard: ... and >= this in the hard regime.
        tie: a ">=" target passes on a tie only if its paired interval's lower end is >= -this (points).
    """

    query_of_oracle: float = 0.95
    hard_margin: float = 3.0
    hard_oracle_gap: float = 2.0
    regime_random_drop: float = 15.0
    regime_oracle_gap: float = 2.0
    backprop_gap: float = 2.0
    memory_ratio: float = 0.3
    time_ratio: float = 0.5
    time_ratio_spread: float = 0.05
    adaptation_recovery: float = 0.5
    adaptation_seeds: int = 3
    adaptation_of_ceiling: float = 0.5
    adaptation_cost: float = 4.0
    module_share: float = 0.137
    query_accuracy: float = 86.0
    field_cost: float = 3.0
    field_cost_hard: float = 1.0
    tie: float = 0.5

    @classmethod
    def of_run(cls, meta: dict[str, Any]) -> TargetThresholds:
        """The thresholds a run recorded; the defaults for results written before runs recorded them."""
        return cls(**meta.get("targets") or {})


@dataclass(frozen=True)
class BenchSettings:
    """The canvas benchmark (``configs/canvas_bench.yaml`` documents each setting).

    Args:
        seeds: relevance-module training seeds; each also draws its own test canvases.
        budgets: token fractions every method is scored at.
        test_images: test canvases per task and seed.
        train: how the relevance modules are trained.
        base: the relevance config file every task starts from.
        tasks: task name -> its settings.
        baselines: the query-agnostic token-reduction baselines.
        variants: name -> an ARR-COC ablation.
        throughput, training_cost, adaptation: the measurements on cluttered canvases; ``None``: not made.
        hard_regime: where allocation decides; ``None``: none in this run.
        targets: the thresholds the report judges by.
    """

    seeds: list[int]
    budgets: list[float]
    test_images: int
    train: TrainSettings
    base: str
    tasks: dict[str, TaskSettings]
    baselines: list[str] = field(default_factory=list)
    variants: dict[str, Variant] = field(default_factory=dict)
    throughput: ThroughputSettings | None = None
    training_cost: TrainingCostSettings | None = None
    adaptation: AdaptationSettings | None = None
    hard_regime: HardRegime | None = None
    targets: TargetThresholds = field(default_factory=TargetThresholds)

    def meta(self) -> dict[str, Any]:
        """The settings ``canvas.json`` records and the report reads (a key only where the file sets it)."""
        return {"seeds": self.seeds, "budgets": self.budgets, "test_images": self.test_images,
                "train": _set_only(self.train), "tasks": {name: _set_only(task) for name, task in self.tasks.items()},
                "hard_regime": None if self.hard_regime is None else dataclasses.asdict(self.hard_regime),
                "targets": dataclasses.asdict(self.targets)}


def _set_only(settings: Any) -> dict[str, Any]:
    """``settings`` as a mapping without the keys left unset, as ``canvas.json`` has always recorded them."""
    return {key: value for key, value in dataclasses.asdict(settings).items() if value not in (None, [], {})}


# ---- reading the file ------------------------------------------------------------------------------------
def load_bench(path: str, quick: bool) -> BenchSettings:
    """The settings in ``path``; with ``quick``, its ``quick:`` section replaces the keys it names."""
    data = load_yaml_mapping(path, known=[*_names(BenchSettings), "quick"], what="benchmark")
    quick_section = data.pop("quick", None)
    if quick:
        _check_keys(quick_section, "quick", _names(BenchSettings), required=[])
        data.update(quick_section)
    return bench_settings(data)


def bench_settings(data: dict[str, Any]) -> BenchSettings:
    """:class:`BenchSettings` from the file's mapping (its ``quick:`` section already applied)."""
    _check_keys(data, "benchmark", _names(BenchSettings), _required(BenchSettings))
    seeds, budgets = data["seeds"], data["budgets"]
    _require(_is_list(seeds, int) and seeds and len(set(seeds)) == len(seeds), "seeds", "a list of distinct integers",
             seeds)
    _require(_is_list(budgets, float) and budgets and all(map(_is_fraction, budgets)), "budgets",
             "a list of token fractions in (0, 1]", budgets)
    _require(_is_positive_int(data["test_images"]), "test_images", "a positive integer", data["test_images"])
    _require(isinstance(data["base"], str), "base", "the path of a relevance config file", data["base"])
    _require(_is_list(data.get("baselines", []), str), "baselines", "a list of names", data.get("baselines"))
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or not tasks or not set(tasks) <= set(TASKS):
        raise ValueError(f"tasks must name some of {list(TASKS)}, got {tasks!r}")
    return BenchSettings(
        seeds=seeds, budgets=budgets, test_images=data["test_images"], train=train_settings(data["train"], list(tasks)),
        base=data["base"], tasks={name: task_settings(name, entry) for name, entry in tasks.items()},
        baselines=data.get("baselines", []),
        variants={name: variant(name, overrides) for name, overrides in (data.get("variants") or {}).items()},
        throughput=_counts(ThroughputSettings, data.get("throughput"), "throughput"),
        training_cost=_counts(TrainingCostSettings, data.get("training_cost"), "training_cost"),
        adaptation=adaptation_settings(data.get("adaptation")), hard_regime=hard_regime(data.get("hard_regime")),
        targets=target_thresholds(data.get("targets") or {}))


def train_settings(data: Any, tasks: list[str]) -> TrainSettings:
    _check_keys(data, "train", _names(TrainSettings), required=["steps", "batch_size"])
    steps = _per_task(data["steps"], tasks, "train.steps")
    global_steps = _per_task(data.get("global_steps", steps), tasks, "train.global_steps")
    _require(_is_positive_int(data["batch_size"]), "train.batch_size", "a positive integer", data["batch_size"])
    norm = data.get("max_grad_norm")
    _require(norm is None or _is_number(norm) and norm > 0, "train.max_grad_norm", "a positive number", norm)
    return TrainSettings(steps, global_steps, data["batch_size"], norm)


def _per_task(steps: Any, tasks: list[str], where: str) -> dict[str, int]:
    """Training steps, one number for every task or one per task: kept as one per task."""
    per_task = steps if isinstance(steps, dict) else dict.fromkeys(tasks, steps)
    if not set(tasks) <= set(per_task) or not all(_is_positive_int(n) for n in per_task.values()):
        raise ValueError(f"{where} must be a positive integer or one per task {tasks}, got {steps!r}")
    return per_task


def task_settings(name: str, data: Any) -> TaskSettings:
    _check_keys(data, f"tasks.{name}", _names(TaskSettings), _required(TaskSettings))
    _require(_is_fraction(data["budget"]), f"tasks.{name}.budget", "a token fraction in (0, 1]", data["budget"])
    extra = data.get("ablation_budgets", [])
    _require(_is_list(extra, float) and all(_is_fraction(b) and b < 1 for b in extra), f"tasks.{name}.ablation_budgets",
             "a list of token fractions in (0, 1)", extra)
    layout = data.get("held_out_layout", [])
    _require(_is_list(layout, float) and all(_is_fraction(b) and b < 1 for b in layout),
             f"tasks.{name}.held_out_layout", "a list of token fractions in (0, 1)", layout)
    _require(not layout or name in LAYOUT_SPLITS, f"tasks.{name}.held_out_layout",
             f"only for a task with a held-out layout ({sorted(LAYOUT_SPLITS)})", layout)
    _require(isinstance(data.get("relevance", {}), dict), f"tasks.{name}.relevance",
             "a mapping of dotted relevance-config keys", data.get("relevance"))
    return TaskSettings(**data)


def variant(name: str, data: Any) -> Variant:
    """A variant from its dotted overrides, less ``tasks`` and ``seeds`` (where it runs)."""
    overrides = dict(data or {})
    tasks, seeds = overrides.pop("tasks", None), overrides.pop("seeds", None)
    if tasks is not None and (not isinstance(tasks, list | tuple) or not set(tasks) <= set(TASKS)):
        raise ValueError(f"variant {name!r}: `tasks` must be a list drawn from {list(TASKS)}, got {tasks!r}")
    if seeds is not None and (not _is_positive_int(seeds) or seeds < 2):
        raise ValueError(f"variant {name!r}: `seeds` (on how many of the run's lowest seeds it runs) must be an "
                         f"integer >= 2, as a paired interval needs two; got {seeds!r}")
    return Variant(overrides, tasks, seeds)


def hard_regime(data: Any) -> HardRegime | None:
    if data is None:  # reported as not measured
        return None
    if not isinstance(data, dict) or set(data) != {"task", "budget"} or data["task"] not in TASKS or not (
            _is_fraction(data["budget"])):
        raise ValueError(f"hard_regime must be {{task: one of {list(TASKS)}, budget: a fraction of the tokens}}, "
                         f"got {data!r}")
    return HardRegime(**data)


def adaptation_settings(data: Any) -> AdaptationSettings | None:
    """The section's own keys; every other key is an ``AdaptationConfig`` setting."""
    if data is None:
        return None
    own = [name for name in _names(AdaptationSettings) if name != "method"]
    required = [name for name in _required(AdaptationSettings) if name != "method"]
    _check_keys(data, "adaptation", own + _names(AdaptationConfig), required)
    for key in ("stream_images", "held_out", "batch", "seeds"):
        _require(key not in data or _is_positive_int(data[key]), f"adaptation.{key}", "a positive integer",
                 data.get(key))
    _require(_is_fraction(data["budget"]), "adaptation.budget", "a token fraction in (0, 1]", data["budget"])
    try:
        method = AdaptationConfig(**{key: value for key, value in data.items() if key not in own})
    except (TypeError, ValueError) as error:
        raise ValueError(f"adaptation: {error}") from None
    return AdaptationSettings(**{key: value for key, value in data.items() if key in own}, method=method)


def target_thresholds(data: Any) -> TargetThresholds:
    _check_keys(data, "targets", _names(TargetThresholds), required=[])
    for key, value in data.items():
        _require(_is_number(value) and value >= 0, f"targets.{key}", "a number >= 0", value)
    return TargetThresholds(**data)


def _counts(cls: type, data: Any, where: str) -> Any:
    """``cls`` from a mapping of positive integers; None if the file leaves the section out."""
    if data is None:
        return None
    _check_keys(data, where, _names(cls), _required(cls))
    for key, value in data.items():
        _require(_is_positive_int(value), f"{where}.{key}", "a positive integer", value)
    return cls(**data)


# ---- checks ----------------------------------------------------------------------------------------------
def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.default is MISSING and f.default_factory is MISSING]


def _check_keys(data: Any, where: str, known: list[str], required: list[str]) -> None:
    """``data`` is a mapping with no key outside ``known`` and every key in ``required``."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with keys among {known}, got {data!r}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise KeyError(f"unknown {where} key(s) {unknown}; known: {sorted(known)}")
    missing = [key for key in required if key not in data]
    if missing:
        raise KeyError(f"{where} lacks the key(s) {missing}; required: {required}")


def _require(ok: Any, where: str, expected: str, given: Any) -> None:
    if not ok:
        raise ValueError(f"{where} must be {expected}, got {given!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_fraction(value: Any) -> bool:
    """A share of the patch tokens (a float: an integer budget would be a token count, ``arrcoc.budget``)."""
    return isinstance(value, float) and 0 < value <= 1


def _is_list(values: Any, kind: type) -> bool:
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)
