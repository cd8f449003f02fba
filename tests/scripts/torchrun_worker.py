"""Run by ``torchrun --nproc_per_node 2`` from tests/test_distributed.py (gloo, CPU).

Every process also computes the single-process update on the whole batch (outside ``sharded_batch``, so
without communication) and compares it with the update made from the shards: the filled .grad after the
all-reduce, the weights after the optimizer step, and the state (feature statistics, rule buffers).
Rank 0 writes what it measured to the JSON file named on the command line.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import arrcoc
from arrcoc.data.toy_patches import query_patch_task
from arrcoc.models.toy_vit import toy_vit
from arrcoc.rules import NonFiniteUpdate, RuleContext, available_rules, build_rule
from arrcoc.rules.distributed import all_reduce_grads, sharded_batch
from arrcoc.rules.relaxation import RelaxationDiverged
from arrcoc.training import Batch, Trainer, TrainerConfig, distributed_loader

# The relevance module under rule assignments that cover every batch-coupled piece: batch-norm statistics
# (all), in-batch negatives (infonce-hebbian), the batch-mean reward baseline (reward), BCM's threshold,
# relaxations that stop for the whole batch (ep, chl), TP's noise and inverses.
MODULE_CONFIGS = {
    # the default rules but the encoder's Hebbian one (Sanger's: a batch-coupled update), not its fixed projection
    "default rules, sanger encoder, attention target": {
        "target": "attention", "rules": {"perspectival_encoder": {"name": "hebbian-oja", "form": "sanger"}}},
    "bcm encoder, reward target": {"target": "reward", "rules": {"perspectival_encoder": {"name": "hebbian-bcm"}}},
    "chl field, tp allocator, perturbation target": {
        "target": "perturbation",
        "rules": {"field": {"name": "chl", "loss": "mse"}, "allocator": {"name": "tp", "loss": "mse"}},
    },
}
SHARDS = (5, 3)  # unequal on purpose: the all-reduce weights each shard by its size
TRAINER_CONFIG = {"target": "reward"}
TRAINER_BATCH = 8  # whole batch: split over the processes by the DistributedSampler


def trainer_dataset() -> TensorDataset:
    batch = query_patch_task(16, torch.Generator().manual_seed(3))
    return TensorDataset(batch.images, batch.query, torch.arange(16) % 10)


def collate(items: list[tuple[torch.Tensor, ...]]) -> Batch:
    images, query, labels = (torch.stack(column) for column in zip(*items))
    return Batch(images, query, labels=labels)


def max_diff(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if (a[k] is None) != (b[k] is None):
            return float("inf")
        if a[k] is not None:
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    return worst


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def state(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def my_rows(rank: int) -> slice:
    start = sum(SHARDS[:rank])
    return slice(start, start + SHARDS[rank])


def relevance_module(rank: int) -> dict[str, dict[str, float]]:
    results = {}
    for label, config in MODULE_CONFIGS.items():
        torch.manual_seed(0)
        single = arrcoc.attach(toy_vit().to(torch.get_default_dtype()), budget=0.25, config=config)
        sharded = copy.deepcopy(single)
        g = torch.Generator().manual_seed(1)
        worst = {"grad": 0.0, "weights": 0.0, "state": 0.0, "reward_baseline": 0.0, "grad_scale": 0.0}
        for _ in range(2):  # the second step starts from the state the first one left
            batch = query_patch_task(sum(SHARDS), g)
            labels = torch.randint(0, 10, (sum(SHARDS),), generator=g)
            rng = torch.get_rng_state()  # TP's noise: the same draws in both
            single.fill_grads(batch.images, batch.query, labels=labels)
            torch.set_rng_state(rng)
            mine = my_rows(rank)
            with sharded_batch():
                sharded.fill_grads(batch.images[mine], batch.query[mine], labels=labels[mine])
                all_reduce_grads(sharded.relevance.parameters(), SHARDS[rank])
            worst["grad"] = max(worst["grad"], max_diff(grads(single.relevance), grads(sharded.relevance)))
            worst["grad_scale"] = max(p.grad.abs().max().item() for p in single.relevance.parameters()
                                      if p.grad is not None)
            single.optimizer.step()
            sharded.optimizer.step()
            worst["weights"] = max(worst["weights"], max_diff(state(single.relevance), state(sharded.relevance)))
            worst["state"] = max(worst["state"], max_diff(state(single.rules), state(sharded.rules)))
            if single._reward_baseline is not None:
                diff = (single._reward_baseline - sharded._reward_baseline).abs().item()
                worst["reward_baseline"] = max(worst["reward_baseline"], diff)
        results[label] = worst
    return results


def rule_subnet(name: str) -> nn.Module:
    if name in ("contrastive-hebbian", "infonce-hebbian"):  # one-layer rules
        return nn.Linear(6, 4)
    if name == "gait-prop":  # invertible activations, out <= in
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


RULE_CONFIGS = {name: {"name": name} for name in available_rules()}
RULE_CONFIGS["pc fixed-prediction"] = {"name": "pc", "variant": "fixed-prediction"}
RULE_CONFIGS["ep random-sign"] = {"name": "ep", "nudge": "random-sign"}


def every_rule(rank: int) -> dict[str, dict[str, float]]:
    results = {}
    for label, config in RULE_CONFIGS.items():
        torch.manual_seed(0)
        net = rule_subnet(config["name"])
        nets = {"single": net, "sharded": copy.deepcopy(net)}
        rules = {k: build_rule(config, n) for k, n in nets.items()}
        rules["sharded"].load_state_dict(rules["single"].state_dict())
        g = torch.Generator().manual_seed(2)
        x = torch.randn(sum(SHARDS), 6, generator=g)
        target = torch.randn(sum(SHARDS), 4, generator=g) if config["name"] in ("contrastive-hebbian",
                                                                            "infonce-hebbian") else \
            torch.randint(0, 4, (sum(SHARDS),), generator=g)
        mine = my_rows(rank)
        rng = torch.get_rng_state()  # rules that draw (random-sign EP, TP's noise) draw the same
        rules["single"].step(RuleContext(x, target=target))
        torch.set_rng_state(rng)
        with sharded_batch():
            rules["sharded"].step(RuleContext(x[mine], target=target[mine]))
            all_reduce_grads(nets["sharded"].parameters(), SHARDS[rank])
        results[label] = {
            "grad": max_diff(grads(nets["single"]), grads(nets["sharded"])),
            "state": max_diff(state(rules["single"]), state(rules["sharded"])),
        }
    return results


def divergence_on_one_shard(rank: int) -> dict[str, object]:
    """Only rank 1's shard overflows: both processes must raise, write no .grad and keep their state."""
    torch.manual_seed(0)
    net = rule_subnet("hebbian-bcm")
    rule = build_rule("hebbian-bcm", net)
    before = state(rule)
    x = torch.randn(4, 6) * (1e30 if rank == 1 else 1.0)
    outcome = {}
    with sharded_batch():
        try:
            rule.step(RuleContext(x))
            outcome["raised"] = None
        except NonFiniteUpdate as error:
            outcome["raised"] = str(error)
        field_rule = build_rule({"name": "ep", "step_size": 1e4, "momentum": 0.0}, rule_subnet("ep"))
        try:
            field_rule.step(RuleContext(torch.randn(4, 6), target=torch.randint(0, 4, (4,))))
            outcome["relaxation"] = None
        except RelaxationDiverged as error:
            outcome["relaxation"] = str(error)
    outcome["grads_written"] = any(p.grad is not None for p in net.parameters())
    outcome["state_changed"] = max_diff(before, state(rule)) > 0
    return outcome


def trainer_under_torchrun(rank: int, checkpoint_dir: str) -> dict[str, object]:
    """Trainer on a DistributedSampler shard: its checkpoint is compared with a one-process run by the test."""
    saves = []
    save_pretrained = arrcoc.ARRCOC.save_pretrained
    arrcoc.ARRCOC.save_pretrained = lambda self, directory: (saves.append(str(directory)),
                                                             save_pretrained(self, directory))[1]
    torch.manual_seed(0)
    model = arrcoc.attach(toy_vit().to(torch.get_default_dtype()), budget=0.25, config=TRAINER_CONFIG)
    if rank != 0:  # different initial weights elsewhere: the trainer must start every process from rank 0's
        with torch.no_grad():
            for p in model.relevance.parameters():
                p.add_(1.0)
    dataset = trainer_dataset()
    loader = distributed_loader(dataset, batch_size=TRAINER_BATCH // dist.get_world_size(), collate_fn=collate)
    trainer = Trainer(model, TrainerConfig(epochs=2, checkpoint_dir=checkpoint_dir, checkpoint_every=1, progress=False))
    trainer.fit(loader)
    digest = torch.cat([t.detach().flatten().double() for t in model.relevance.state_dict().values()])
    digests = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(digests, digest)
    arrcoc.ARRCOC.save_pretrained = save_pretrained
    return {"saves": len(saves), "weights_equal_on_all_ranks": all(torch.equal(d, digests[0]) for d in digests)}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    report: dict[str, object] = {"world_size": dist.get_world_size()}
    for dtype in (torch.float64, torch.float32):  # float64: exactness; float32: what rounding adds
        torch.set_default_dtype(dtype)
        name = str(dtype).removeprefix("torch.")
        report[f"relevance_module_{name}"] = relevance_module(rank)
        report[f"every_rule_{name}"] = every_rule(rank)
    torch.set_default_dtype(torch.float64)
    report[f"trainer_rank{rank}"] = trainer_under_torchrun(rank, sys.argv[2])
    torch.set_default_dtype(torch.float32)
    report[f"divergence_rank{rank}"] = divergence_on_one_shard(rank)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        merged = {k: v for r in reports for k, v in r.items()}
        with open(sys.argv[1], "w") as f:
            json.dump(merged, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
