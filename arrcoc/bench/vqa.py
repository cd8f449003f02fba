"""Canvas VQA (issue 38): ``arrcoc bench vqa [--quick]``: every visual-token pruner and ARR-COC on the trained canvas
VLM (:mod:`arrcoc.bench.train_vlm`), at 64 / 32 / 16 / 8 of its 256 visual tokens.

For each method and budget, on test canvases (TEST source digits, held-out phrasings): answer accuracy per question
kind (the next token after ``answer :``, greedy, as ``generate`` gives it) and the share of the kept tokens that lie
on the digits the answer depends on; per method, where its kept tokens lie (a heatmap over the 16 x 16 grid: position
bias); prefill time (tower, projector, the method's own selection, language model) as a ratio to the full model's,
at batch 1 and 16, repeats interleaved. ARR-COC (:func:`arrcoc.attach_vlm`, the prompt's own embedding as its query)
learns by its local rules from the VLM's perturbation target (how far the next-token distribution moves when a 2 x 2
group of visual tokens is dropped: label-free, forward passes only), over 5 seeds, paired with every baseline; then
it adapts online on the shift split (other backgrounds and colour shades) from the same label-free target.

    arrcoc bench vqa            # benchmarks/results/vqa.{json,md} + PNGs
    arrcoc bench vqa --quick    # a tiny model trained on the spot, runs/quick/
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

import arrcoc
from arrcoc.backbones.vlm import adapt_vlm
from arrcoc.baselines.vlm_pruners import (
    PRUNERS,
    PruningContext,
    apply_selection,
    dart,
    fastv,
    pruned_prefill,
    pyramid_drop,
    pyramid_tokens,
)
from arrcoc.config import parse_with_config
from arrcoc.data.vqa import VQABatch, ask, vqa_split
from arrcoc.models.canvas_vlm import canvas_prompts
from arrcoc.relevance.field import FieldRelaxation
from arrcoc.relevance.module import RelevanceConfig
from arrcoc.relevance.targets import box_target
from arrcoc.relevance.vlm import VLMARRCOC, VLMConfig
from arrcoc.reporting import RESULTS, output_dir, read_json, run_metadata

from .canvas_report import write_report
from .train_vlm import DEFAULT_DIR, accuracy_by_kind, as_uint8, input_embeddings, load_canvas_vlm
from .vqa_report import BEFORE_LM, INSIDE_LM, write_vqa_report

REPORT = RESULTS.parent / "REPORT.md"
GRID = 16  # the canvas VLM's 16 x 16 visual tokens
PRUNE_INSIDE = dict(zip(INSIDE_LM, (fastv, dart)))
PYRAMID = {"stages": (1, 2, 3), "ratio": 0.5}  # the paper's lambda = 0.5 at each stage of a 4-layer language model


@dataclass(frozen=True)
class VQABenchSettings:
    """What one run measures.

    Args:
        budgets: visual tokens kept of 256.
        test_canvases: test canvases (one question each) every method answers.
        seeds: ARR-COC training seeds (the random baseline draws its tokens with each of them too).
        train_canvases: training prompts ARR-COC learns from (their perturbation targets computed once).
        epochs: passes of each seed's training over them, ``learn_batch`` prompts per update.
        arrcoc_budget: the budget ARR-COC trains at (its allocator's K).
        shift_stream, shift_test: online adaptation: shift canvases it learns from as they come, and others it is
            measured on after.
        timing_batches, timing_repeats: prefill timing: the batch sizes, and how many interleaved repeats each gets
            (more at batch 1: a repeat there takes milliseconds, and its ratios spread most).
        chunk: prompts per forward when measuring accuracy.
        compiled: ARR-COC's prefill timed with its scoring compiled whole (``graphs=True``, its inference path on a
            GPU; each batch size compiles once, tens of seconds here); its accuracy is measured eager (the same
            tokens kept: tests/test_vlm.py), which spares compiling every seed's module.
    """

    budgets: tuple[int, ...] = (64, 32, 16, 8)
    test_canvases: int = 600
    seeds: int = 5
    train_canvases: int = 2048
    epochs: int = 6
    learn_batch: int = 16
    arrcoc_budget: int = 16
    shift_stream: int = 192
    shift_test: int = 300
    timing_batches: tuple[int, ...] = (1, 16)
    timing_repeats: tuple[int, ...] = (150, 15)
    chunk: int = 50
    compiled: bool = True
    threads: int = 2

    def __post_init__(self) -> None:
        if len(self.timing_repeats) != len(self.timing_batches):
            raise ValueError(f"timing_repeats gives the repeats of each timing batch size: {len(self.timing_batches)} "
                             f"sizes {self.timing_batches}, got {len(self.timing_repeats)} ({self.timing_repeats})")


QUICK = VQABenchSettings(budgets=(16, 8), test_canvases=12, seeds=2, train_canvases=8, epochs=1, learn_batch=4,
                         shift_stream=4, shift_test=6, timing_repeats=(1, 1), chunk=6, compiled=False)


def arrcoc_config(budget: int) -> VLMConfig:
    """ARR-COC on the canvas VLM: the query task's design (the question singles out patches within each image:
    contrastive-Hebbian participatory coupling over the image's patches; the canvas benchmark's step sizes), taught
    by the VLM's label-free perturbation target. Its field relaxes 10 steps at inference, not 40: the same accuracy
    here, a quarter of the relaxation's operators in each prefill (docs/decisions.md, "Ninth session")."""
    relevance = RelevanceConfig(budget=budget, target="perturbation", participatory_contrast="patches",
                                rules={"participatory": {"name": "contrastive-hebbian"}},
                                optimizer={"name": "adam", "lr": 3e-3, "subnetwork_lr": {"field": 0.03}},
                                relaxation=FieldRelaxation(inference_steps=10))
    return VLMConfig(relevance=relevance, group=2, chunk=32)


# ---- the methods ------------------------------------------------------------------------------------
@dataclass
class Answered:
    """One method's prefill of a batch: next-token logits (B, V) and the visual tokens kept (B, K), None: all."""

    logits: Tensor
    kept: Tensor | None


Method = Callable[[dict[str, Any], VQABatch, int], Answered]  # (model inputs, the batch's truth, seed)


def prompt_inputs(tokenizer: Any, batch: VQABatch) -> dict[str, Any]:
    """Processor-shaped inputs of the batch's questions about its canvases."""
    return {**canvas_prompts(tokenizer, batch.questions, GRID * GRID), "pixel_values": batch.images.float() / 255}


def _full(model: Any) -> Method:
    adapter = adapt_vlm(model)
    return lambda inputs, truth, seed: Answered(adapter.forward(adapter.encode(inputs), logits_to_keep=1).logits[:, -1],
                                                None)


def _before_lm(model: Any, name: str, budget: int) -> Method:
    adapter = adapt_vlm(model)

    def run(inputs: dict[str, Any], truth: VQABatch, seed: int) -> Answered:
        prompt = adapter.encode(inputs)
        context = PruningContext(prompt, budget, truth.boxes, truth.relevant, seed, model, inputs["pixel_values"])
        selection = PRUNERS[name](context)
        out = adapter.forward(apply_selection(prompt, selection), selection.keep, logits_to_keep=1)
        return Answered(out.logits[:, -1], torch.stack(selection.keep))

    return run


def _inside_lm(model: Any, make_prune: Callable[[], Callable]) -> Method:
    """A method that prunes between decoder layers; the visual tokens kept at its (one) pruning layer are
    reported."""
    adapter = adapt_vlm(model)

    def run(inputs: dict[str, Any], truth: VQABatch, seed: int) -> Answered:
        prompt = adapter.encode(inputs)
        visual = prompt.input_ids == model.config.image_token_id
        embeds = input_embeddings(model, prompt.input_ids, torch.cat(prompt.features))
        prune, seen = make_prune(), []

        def spy(view):
            keep = prune(view)
            if keep is not None and not seen:
                index = view.visual.long().cumsum(1) - 1  # the visual token each column holds
                picked = view.visual.gather(1, keep)
                seen.append(index.gather(1, keep)[picked].view(len(keep), -1))
            return keep

        logits = pruned_prefill(model, embeds, prompt.attention_mask, prompt.position_ids, visual, spy)
        return Answered(logits, seen[0] if seen else None)

    return run


def _arrcoc(wrapped: VLMARRCOC, budget: int) -> Method:
    def run(inputs: dict[str, Any], truth: VQABatch, seed: int) -> Answered:
        wrapped.budget = budget
        prompt = wrapped.adapter.encode(inputs)
        keep = wrapped.kept_tokens(prompt)
        out = wrapped.adapter.forward(prompt, keep, logits_to_keep=1)
        return Answered(out.logits[:, -1], None if keep is None else torch.stack(keep))

    return run


def without_answer(model: Any) -> Method:
    """Every visual token except those of the patches any ink box of the answer's digits touches: where the
    answer comes from if it is read off the image (local accuracy should fall to near chance)."""
    adapter = adapt_vlm(model)

    def run(inputs: dict[str, Any], truth: VQABatch, seed: int) -> Answered:
        prompt = adapter.encode(inputs)
        cell = truth.images.shape[-1] // GRID
        keep = []
        for boxes, relevant in zip(truth.boxes, truth.relevant):
            touched = box_target(boxes[relevant], (GRID, GRID), (cell, cell)).amax(0) > 0
            keep.append((~touched).nonzero()[:, 0])
        return Answered(adapter.forward(prompt, keep, logits_to_keep=1).logits[:, -1], None)

    return run


def methods_at(model: Any, budget: int) -> dict[str, Method]:
    """Every baseline (and the box oracle) at ``budget`` visual tokens."""
    methods = {name: _before_lm(model, name, budget) for name in (*BEFORE_LM, "oracle")}
    methods |= {name: _inside_lm(model, lambda make=make: make(model, budget)) for name, make in PRUNE_INSIDE.items()}
    return methods


def pyramid_method(model: Any) -> Method:
    return _inside_lm(model, lambda: pyramid_drop(model, PYRAMID["stages"], PYRAMID["ratio"]))


# ---- measuring ----------------------------------------------------------------------------------------
def on_digits(kept: Tensor, truth: VQABatch) -> Tensor:
    """(B,) the share of each prompt's kept tokens whose patch centre lies in the ink box of a digit the answer
    depends on."""
    centres = (torch.stack([kept % GRID, kept // GRID], -1).float() + 0.5) * (truth.images.shape[-1] / GRID)
    boxes = truth.boxes[:, None]  # (B, 1, S, 4)
    inside = ((centres[:, :, None] >= boxes[..., :2]) & (centres[:, :, None] < boxes[..., 2:])).all(-1)
    return (inside & truth.relevant[:, None]).any(-1).float().mean(1)


@torch.no_grad()
def evaluate(method: Method, tokenizer: Any, batch: VQABatch, seed: int, chunk: int) -> dict[str, Any]:
    """Accuracy per question kind (%), the kept tokens' share on the answer's digits (%) and where they lie (a
    (GRID * GRID,) count)."""
    answers, share, where = [], [], torch.zeros(GRID * GRID)
    for start in range(0, len(batch), chunk):
        part = batch.rows(slice(start, start + chunk))
        out = method(prompt_inputs(tokenizer, part), part, seed)
        answers += tokenizer.convert_ids_to_tokens(out.logits.argmax(-1).tolist())
        if out.kept is not None:
            share.append(on_digits(out.kept, part))
            where += torch.bincount(out.kept.flatten(), minlength=GRID * GRID).float()
    result = {"accuracy": accuracy_by_kind(answers, batch)}
    if share:
        result |= {"on_answer_digits": 100 * torch.cat(share).mean().item(), "positions": where.tolist()}
    return result


def perturbation_targets(model: Any, tokenizer: Any, batch: VQABatch, budget: int, chunk: int) -> list[Tensor]:
    """Per prompt, the VLM's label-free perturbation target over its visual tokens (the module does not enter it:
    computed once, shared by every seed)."""
    probe = arrcoc.attach_vlm(model, budget, arrcoc_config(budget))
    targets = []
    for start in tqdm(range(0, len(batch), chunk), desc="perturbation targets", leave=False):
        prompt = probe.adapter.encode(prompt_inputs(tokenizer, batch.rows(slice(start, start + chunk))))
        targets += probe.relevance_target(prompt)
    return targets


def train_arrcoc(model: Any, tokenizer: Any, batch: VQABatch, targets: list[Tensor], settings: VQABenchSettings,
                 seed: int) -> VLMARRCOC:
    """ARR-COC on the VLM, one seed: ``epochs`` passes of its local rules over the prompts towards their targets."""
    torch.manual_seed(seed)
    wrapped = arrcoc.attach_vlm(model, settings.arrcoc_budget, arrcoc_config(settings.arrcoc_budget))
    order = random.Random(seed)
    for _ in range(settings.epochs):
        rows = list(range(len(batch)))
        order.shuffle(rows)
        for start in range(0, len(rows), settings.learn_batch):
            pick = rows[start:start + settings.learn_batch]
            part = batch.rows(pick)
            wrapped.learn(target=[targets[i] for i in pick], **prompt_inputs(tokenizer, part))
    return wrapped.eval()


# Adam at a thirtieth of training's step size: at training's 3e-3 adapting lowered accuracy on every seed; at 1e-4 it
# added to what the restarted statistics gave, on a shift sample apart from the test (docs/decisions.md: Tenth session)
ADAPTATION = {"lr": 1e-4, "max_grad_norm": 1.0, "feature_statistics": "restarted"}


def adapt_online(wrapped: VLMARRCOC, tokenizer: Any, stream: VQABatch, test: VQABatch,
                 settings: VQABenchSettings) -> dict[str, Any]:
    """The trained module on the shift split: its accuracy frozen, then after learning from ``stream`` as it comes
    (label-free: the perturbation target from the model's own full-token answers), on the held-out ``test``. Its
    patch features' normalisation statistics restart on the stream (AdaBN: Li et al. 2016, "Revisiting Batch
    Normalization For Practical Domain Adaptation"): the shift moves colours and backgrounds, and the statistics of
    the training stream would keep standardising the features as if it had not. The module's weights and statistics
    are restored afterwards."""
    method = _arrcoc(wrapped, settings.arrcoc_budget)
    frozen = evaluate(method, tokenizer, test, 0, settings.chunk)["accuracy"]
    saved = {k: v.clone() for k, v in wrapped.state_dict().items()}
    wrapped.relevance.feature_norm.reset_running_stats()  # learn()'s passes (training mode) gather the stream's
    optimizer = torch.optim.Adam(wrapped.relevance.parameters(), lr=ADAPTATION["lr"])
    start = time.perf_counter()
    for first in range(0, len(stream), settings.learn_batch):
        part = stream.rows(range(first, min(first + settings.learn_batch, len(stream))))
        wrapped.learn(optimizer=optimizer, max_grad_norm=ADAPTATION["max_grad_norm"], **prompt_inputs(tokenizer, part))
    seconds = time.perf_counter() - start
    adapted = evaluate(method, tokenizer, test, 0, settings.chunk)["accuracy"]
    wrapped.load_state_dict(saved)
    return {"frozen": frozen, "adapted": adapted, "seconds_per_image": seconds / len(stream)}


def prefill_times(methods: dict[str, Method], inputs: dict[str, Any], batch: VQABatch, repeats: int
                  ) -> dict[str, float]:
    """Median over ``repeats`` of each method's prefill time on ``batch`` (its model ``inputs``) as a ratio to the full
    model's in the same repeat (the methods in a new random order each repeat: this machine's speed drifts)."""
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    order = random.Random(0)
    for _ in range(repeats):
        names = list(methods)
        order.shuffle(names)
        seconds = {}
        for name in ["full", *names]:
            start = time.perf_counter()
            methods[name](inputs, batch, 0)
            seconds[name] = time.perf_counter() - start
        for name in methods:
            ratios[name].append(seconds[name] / seconds["full"])
    return {name: statistics.median(values) for name, values in ratios.items()}


# ---- the run ------------------------------------------------------------------------------------------
def baseline_accuracies(model: Any, tokenizer: Any, test: VQABatch, settings: VQABenchSettings) -> dict[str, Any]:
    """Every baseline (and the oracle) at every budget; the random one once per seed, the others once (they are
    deterministic); PyramidDrop at its own schedule."""
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for budget in tqdm(settings.budgets, desc="baselines"):
        for name, method in methods_at(model, budget).items():
            seeds = range(settings.seeds) if name == "random" else range(1)
            table.setdefault(name, {})[str(budget)] = [evaluate(method, tokenizer, test, s, settings.chunk)
                                                       for s in seeds]
    tokens = pyramid_tokens(GRID * GRID, model.config.text_config.num_hidden_layers, PYRAMID["stages"],
                            PYRAMID["ratio"])
    pyramid = evaluate(pyramid_method(model), tokenizer, test, 0, settings.chunk)
    return {"methods": table, "pyramiddrop": {**pyramid, "mean_tokens": tokens, **PYRAMID}}


def arrcoc_runs(model: Any, tokenizer: Any, test: VQABatch, settings: VQABenchSettings, out: Path
                ) -> tuple[dict[str, Any], list[VLMARRCOC]]:
    """ARR-COC over the seeds: trained, then measured at every budget; the seed-0 module saved to
    ``out/models/vqa``."""
    train = ask(as_uint8(vqa_split("train", settings.train_canvases, seed=50)), seed=51)
    start = time.perf_counter()
    targets = perturbation_targets(model, tokenizer, train, settings.arrcoc_budget, settings.learn_batch)
    target_seconds = time.perf_counter() - start
    table: dict[str, list[dict[str, Any]]] = {str(b): [] for b in settings.budgets}
    modules, train_seconds = [], []
    for seed in tqdm(range(settings.seeds), desc="ARR-COC seeds"):
        start = time.perf_counter()
        wrapped = train_arrcoc(model, tokenizer, train, targets, settings, seed)
        train_seconds.append(time.perf_counter() - start)
        for budget in settings.budgets:
            table[str(budget)].append(evaluate(_arrcoc(wrapped, budget), tokenizer, test, seed, settings.chunk))
        wrapped.budget = settings.arrcoc_budget
        modules.append(wrapped)
    modules[0].save_pretrained(out / "models" / "vqa")
    return {"accuracy": table, "target_seconds": target_seconds, "train_seconds": train_seconds}, modules


def timing(model: Any, tokenizer: Any, test: VQABatch, wrapped: VLMARRCOC, settings: VQABenchSettings
           ) -> dict[str, dict[str, dict[str, float]]]:
    """Prefill time ratios to the full model per batch size and budget (ARR-COC: the seed-0 module, compiled if
    ``settings.compiled``: once per batch size, in a warm-up call; the budget is an input of the compiled graph)."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    wrapped.graphs = settings.compiled
    for size, repeats in zip(settings.timing_batches, settings.timing_repeats, strict=True):
        result[str(size)] = _timing_at(model, tokenizer, test.rows(slice(0, size)), wrapped, settings.budgets, repeats)
    wrapped.graphs, wrapped.budget = None, settings.arrcoc_budget
    return result


def _timing_at(model: Any, tokenizer: Any, batch: VQABatch, wrapped: VLMARRCOC, budgets: tuple[int, ...],
               repeats: int) -> dict[str, dict[str, float]]:
    result, inputs = {}, prompt_inputs(tokenizer, batch)
    for budget in budgets:
        methods = {"full": _full(model), **methods_at(model, budget), "ARR-COC": _arrcoc(wrapped, budget)}
        methods.pop("oracle")
        for method in methods.values():  # a warm-up call each: ARR-COC compiles here
            method(inputs, batch, 0)
        result[str(budget)] = prefill_times(methods, inputs, batch, repeats)
    pyramid = {"full": _full(model), "pyramiddrop": pyramid_method(model)}
    result["pyramiddrop"] = prefill_times(pyramid, inputs, batch, repeats)
    return result


def adaptation(modules: list[VLMARRCOC], model: Any, tokenizer: Any, settings: VQABenchSettings) -> dict[str, Any]:
    """Online adaptation of every seed's module on the shift split; the label-free ceiling is the full model's
    accuracy there."""
    stream = ask(as_uint8(vqa_split("shift", settings.shift_stream, seed=60)), seed=61)
    test = as_uint8(vqa_split("shift", settings.shift_test, seed=70))
    full = evaluate(_full(model), tokenizer, test, 0, settings.chunk)["accuracy"]
    runs = [adapt_online(wrapped, tokenizer, stream, test, settings) for wrapped in tqdm(modules, desc="adaptation")]
    return {"full": full, "seeds": runs, "budget": settings.arrcoc_budget, "stream": len(stream), "held_out": len(test),
            **ADAPTATION}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arrcoc bench vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny VLM trained on the spot, 2 seeds (a smoke run)")
    parser.add_argument("--model", type=Path, default=None, help=f"the canvas VLM's folder (default {DEFAULT_DIR})")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of defaults for these options")
    return parse_with_config(parser, argv)


def load_model(args: argparse.Namespace, out: Path) -> tuple[Any, Any]:
    """The canvas VLM: the committed one (or ``--model``); with ``--quick`` and no ``--model`` a tiny one trained
    now."""
    if args.model is None and args.quick:
        from .train_vlm import main as train_main

        return load_canvas_vlm(train_main(["--quick", "--out", str(out / "canvas_vlm")]))
    return load_canvas_vlm(args.model or DEFAULT_DIR)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    settings = QUICK if args.quick else VQABenchSettings()
    settings = dataclasses.replace(settings, threads=args.threads or settings.threads)
    torch.set_num_threads(settings.threads)
    out = output_dir(args.out, args.quick)
    start = time.perf_counter()
    model, tokenizer = load_model(args, out)
    test = as_uint8(vqa_split("test", settings.test_canvases, seed=0))
    results: dict[str, Any] = {"full": evaluate(_full(model), tokenizer, test, 0, settings.chunk),
                               "without_answer": evaluate(without_answer(model), tokenizer, test, 0, settings.chunk)}
    results |= baseline_accuracies(model, tokenizer, test, settings)
    results["arrcoc"], modules = arrcoc_runs(model, tokenizer, test, settings, out)
    results["timing"] = timing(model, tokenizer, test, modules[0], settings)
    results["adaptation"] = adaptation(modules, model, tokenizer, settings)
    command = "arrcoc bench vqa" + (" --quick" if args.quick else "")
    results = {"meta": run_metadata(command, args.quick, settings=dataclasses.asdict(settings),
                                    model=str(args.model or DEFAULT_DIR), wall_seconds=time.perf_counter() - start),
               **results}
    written = write_vqa_report(results, out)
    canvas = read_json(out / "canvas.json")
    if out.resolve() == RESULTS.resolve() and canvas:  # the committed report carries the VQA targets too
        write_report(canvas, out, REPORT)
    return written


if __name__ == "__main__":
    main()
