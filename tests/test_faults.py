"""Faults with nothing lost: killed saves, resumed training, injected divergence, determinism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import arrcoc
from arrcoc.data.toy_patches import query_patch_task
from arrcoc.models.toy_vit import toy_vit
from arrcoc.rules import NonFiniteUpdate
from arrcoc.rules.relaxation import RelaxationDiverged
from arrcoc.training import Batch, Trainer, TrainerConfig

# every piece of state a step reads: Adam moments, BCM thresholds, the reward baseline, feature statistics,
# and the global RNG (random-sign EP draws the sign of its nudge from it)
STATEFUL = {"target": "reward", "rules": {"perspectival_encoder": {"name": "hebbian-bcm"},
                                          "field": {"name": "ep", "loss": "mse", "nudge": "random-sign"}}}


def test_a_process_killed_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "report.json"
    script = Path(__file__).parent / "scripts" / "kill_during_save.py"
    result = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for kind, outcomes in json.loads(out.read_text()).items():
        loaded = [outcome for _, _, outcome in outcomes]
        assert len(loaded) >= 4, kind  # the save was stopped at each of its file-system steps
        assert set(loaded) <= {"previous", "new"}, (kind, outcomes)  # always loadable, never a mixture
        assert loaded[0] == "previous" and loaded[-1] == "new", (kind, outcomes)
        commit = loaded.index("new")
        assert loaded[commit:] == ["new"] * (len(loaded) - commit), (kind, outcomes)  # one commit point


def batches(n: int = 3, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        task = query_patch_task(8, g)
        out.append(Batch(task.images, task.query, labels=torch.randint(0, 10, (8,), generator=g)))
    return out


def state(model: arrcoc.ARRCOC) -> dict[str, torch.Tensor]:
    tensors = {f"relevance.{k}": v for k, v in model.relevance.state_dict().items()}
    tensors.update({f"rules.{k}": v for k, v in model.rules.state_dict().items()})
    for i, param_state in model.optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in param_state.items()})
    tensors["reward_baseline"] = model._reward_baseline
    return {k: v.clone() for k, v in tensors.items()}


class Interrupted(Exception):
    pass


def train(checkpoint_dir: Path, data: list[Batch], stop_after: int | None = None, resume: bool = False
          ) -> arrcoc.ARRCOC:
    backbone = toy_vit()
    torch.manual_seed(0)
    model = arrcoc.attach(backbone, budget=0.25, config=STATEFUL)
    trainer = Trainer(model, TrainerConfig(epochs=2, checkpoint_dir=str(checkpoint_dir), checkpoint_every=2,
                                           progress=False))
    if stop_after is not None:  # the process dies after `stop_after` steps
        step, done = trainer._step, []

        def dying_step(batch: Batch) -> dict[str, float]:
            if len(done) == stop_after:
                raise Interrupted
            done.append(1)
            return step(batch)

        trainer._step = dying_step
        with pytest.raises(Interrupted):
            trainer.fit(data)
        return model
    trainer.fit(data, resume=resume)
    return model


def assert_same_state(a: arrcoc.ARRCOC, b: arrcoc.ARRCOC) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_training_resumes_to_the_same_result_as_an_uninterrupted_run(tmp_path):
    data = batches()
    uninterrupted = train(tmp_path / "uninterrupted", data)
    train(tmp_path / "resumed", data, stop_after=5)  # checkpoints after steps 2 and 4 (mid-epoch 2)
    torch.manual_seed(1234)  # the resumed process starts with another RNG state: the checkpoint restores it
    resumed = train(tmp_path / "resumed", data, resume=True)
    assert_same_state(uninterrupted, resumed)


def test_same_seed_same_results_on_cpu(tmp_path):
    data = batches()
    assert_same_state(train(tmp_path / "a", data), train(tmp_path / "b", data))
    images = data[0].images
    first, second = (arrcoc.ARRCOC.from_pretrained(tmp_path / d, toy_vit()) for d in ("a", "b"))
    assert torch.equal(first(images, data[0].query), second(images, data[0].query))


@pytest.mark.parametrize("injected", ["field relaxation step size", "field rule step size", "overflowing rule"])
def test_injected_divergence_is_reported_and_changes_nothing(injected):
    backbone = toy_vit()
    torch.manual_seed(0)
    model = arrcoc.attach(backbone, budget=0.25, config=STATEFUL)
    first, second = batches(2)
    model.learn(first.images, first.query, labels=first.labels)  # optimizer moments, baseline, statistics
    with torch.no_grad():
        model.relevance.field.excitation.fill_(5.0)  # a stiff field: a large state step overshoots
    if injected == "field relaxation step size":  # the relaxation every forward pass runs
        model.config.relaxation.step_size, model.config.relaxation.momentum = 50.0, 0.0
    elif injected == "field rule step size":  # only the EP rule's free and nudged phases
        model.rules["field"].config.step_size, model.rules["field"].config.momentum = 50.0, 0.0
    else:  # BCM's y (y - theta) overflows float32
        with torch.no_grad():
            model.relevance.perspectival.encoder.weight.mul_(1e20)
    before = state(model)
    expected = NonFiniteUpdate if injected == "overflowing rule" else RelaxationDiverged
    with pytest.raises(expected) as error:
        model.learn(second.images, second.query, labels=second.labels)
    assert ("'hebbian-bcm'" if expected is NonFiniteUpdate else "step_size") in str(error.value)
    assert all(p.grad is None for p in model.relevance.parameters())
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, buffers, optimizer, baseline


def test_online_adaptation_skips_a_diverging_update_and_says_why():
    model = arrcoc.attach(toy_vit(), budget=0.25)
    with torch.no_grad():
        model.relevance.field.excitation.fill_(5.0)
    model.rules["field"].config.step_size, model.rules["field"].config.momentum = 50.0, 0.0
    before = {k: v.clone() for k, v in model.relevance.state_dict().items()}
    report = model.adapt(torch.rand(4, 3, 32, 32))
    assert report.skipped is not None and "diverged" in report.skipped
    assert all(torch.equal(v, model.relevance.state_dict()[k]) for k, v in before.items())


def test_a_divergence_raised_in_a_worker_process_reaches_the_parent_whole():
    """The canvas benchmark trains in a process pool: its errors are pickled on the way back."""
    import pickle

    error = pickle.loads(pickle.dumps(RelaxationDiverged(3, [1.0, 2.0], "energy rose")))
    assert isinstance(error, RelaxationDiverged) and (error.step, error.energy_trace) == (3, [1.0, 2.0])
    assert "energy rose" in str(error)
