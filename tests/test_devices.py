"""Standard PyTorch inference and training idioms on an attached model: inference mode, reduced-precision autocast,
torch.compile. CPU, tiny random-weight models."""

import torch

import arrcoc
from arrcoc.data.toy_patches import WHITE, textured_patch_images, word_queries
from arrcoc.data.toy_vlm import BOS, IMAGE, toy_prompts, toy_vlm
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance import AdaptReport
from arrcoc.relevance.field import RelevanceField, grid_positions
from arrcoc.rules.relaxation import Relaxation, relax


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images, _ = textured_patch_images(n, [WHITE], g)
    return images, word_queries(torch.randint(0, 2, (n,), generator=g), g)


def trained(seed: int = 0, **kwargs) -> arrcoc.ARRCOC:
    """An attached toy ViT whose relevance module has learned a few steps (so that no part of it is trivial)."""
    torch.manual_seed(seed)
    model = arrcoc.attach(toy_vit(), budget=0.25, **kwargs)
    for step in range(3):
        model.learn(*batch(seed=step))
    return model


def test_inference_mode_gives_exactly_the_no_grad_outputs():
    model = trained()
    images, query = batch(seed=10)
    with torch.no_grad():
        logits, maps = model(images, query), model.relevance_map(images, query)
    with torch.inference_mode():
        fast_logits, fast_maps = model(images, query), model.relevance_map(images, query)
        unqueried = model(images)
    assert fast_logits.is_inference() and torch.equal(fast_logits, logits)
    assert all(torch.equal(getattr(fast_maps, k), getattr(maps, k)) for k in vars(maps))
    with torch.no_grad():
        assert torch.equal(unqueried, model(images))


def test_inference_mode_gives_exactly_the_no_grad_outputs_of_a_vlm():
    model = toy_vlm("llava")
    inputs = toy_prompts(model, [[BOS, 5, IMAGE, 6, 7], [BOS, 8, IMAGE, 9, IMAGE, 10, 11, 12]])
    wrapped = arrcoc.attach_vlm(model, budget=0.25)
    wrapped.learn(**inputs)  # the relevance module leaves its initial state

    def run():
        allocation = wrapped.allocate(**inputs)
        return (allocation.keep, allocation.logits, wrapped(**inputs).logits,
                wrapped.generate(**inputs, max_new_tokens=3, do_sample=False))

    with torch.no_grad():
        reference = run()
    with torch.inference_mode():
        fast = run()
    assert fast[2].is_inference()
    for got, want in zip(fast, reference):
        for a, b in zip(got, want) if isinstance(got, list) else [(got, want)]:
            assert torch.equal(a, b)


def one_sgd_step(model: arrcoc.ARRCOC, images: torch.Tensor, query: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    """The change of every weight of the relevance module in one learn() step with plain SGD."""
    before = [p.detach().clone() for p in model.relevance.parameters()]
    optimizer = torch.optim.SGD(model.relevance.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.learn(images, query, optimizer=optimizer)
    return [p.detach() - b for p, b in zip(model.relevance.parameters(), before)]


def test_learning_under_bf16_autocast_updates_in_float32_close_to_the_float32_step():
    images, query = batch()
    reference = one_sgd_step(trained(), images, query, bf16=False)
    model = trained()
    seen = []  # the backbone's matmuls do run in bf16
    model.adapter.model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    low = one_sgd_step(model, images, query, bf16=True)
    assert seen and set(seen) == {torch.bfloat16}
    fixed = set(model.relevance.subnetworks()["perspectival_encoder"].parameters())  # a fixed random projection
    for p in model.relevance.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        assert p.grad is None if p in fixed else p.grad.dtype == torch.float32
    # the rules are float32; only the backbone's tokens and CLS-attention target carry bf16 rounding (8 significant
    # bits, a relative error of up to 0.4% per rounding, compounded through the block), so each update stays within a
    # few percent of the float32 one
    for name, a, b in zip([n for n, _ in model.relevance.named_parameters()], low, reference):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-7, name
    total = torch.cat([(a - b).flatten() for a, b in zip(low, reference)]).norm()
    assert total <= 0.01 * torch.cat([b.flatten() for b in reference]).norm()


def test_adapt_runs_under_bf16_autocast():
    model = trained()
    images, query = batch(seed=20)
    before = [p.detach().clone() for p in model.relevance.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reports = [model.adapt(images, query) for _ in range(2)]
    assert all(isinstance(r, AdaptReport) and r.skipped is None for r in reports)
    assert any(not torch.equal(p, b) for p, b in zip(model.relevance.parameters(), before))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.relevance.parameters())


def test_a_reduced_precision_query_is_read_in_float32():
    model = trained()
    images, query = batch(seed=40)
    low = query.bfloat16()  # e.g. a text encoder's embeddings under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert torch.equal(model(images, low), model(images, low.float()))
        model.learn(images, low)
    assert all(torch.isfinite(p).all() for p in model.relevance.parameters())


def test_torch_compile_matches_eager():
    # aot_eager traces the model through dynamo and AOTAutograd as inductor does, without inductor's code
    # generation and C++ compilation, too slow for a unit test on a small CPU
    model = trained()
    images, query = batch(seed=30)
    compiled = torch.compile(model, backend="aot_eager")
    try:
        with torch.no_grad():
            expected = [model(images, q) for q in (query, None)]
        for idiom in (torch.no_grad, torch.inference_mode):
            with idiom():
                for q, want in zip((query, None), expected):
                    assert torch.allclose(compiled(images, q), want, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_relax_descends_by_autograd_in_inference_mode_too():
    field = RelevanceField(8, 0.25)
    x = RelevanceField.pack(torch.randn(2, 16, 3), torch.randn(2, 16), grid_positions(4, 4), torch.randn(2, 8))
    target = torch.rand(2, 16)
    results = []
    for idiom in (torch.no_grad, torch.inference_mode):
        with idiom():  # a nudged phase, its input and target made in that mode
            states, report = relax(field.as_energy(), x.clone(), 0.5, target.clone(),
                                   how=Relaxation(steps=50, step_size=0.2, momentum=0.0, tol=1e-5, backtracks=0))
        results.append((states[0], report.steps))
    (a, steps), (b, same_steps) = results
    assert steps > 1 and steps == same_steps and torch.equal(a, b) and not b.is_inference()


def test_attach_puts_the_relevance_module_where_the_model_is():
    """A model on another device gets its relevance module there (a CUDA ViT got a CPU module before; the
    meta device stands in for CUDA on a CPU-only machine). The optimizer keeps the moved parameters."""
    model = arrcoc.attach(toy_vit().to("meta"), budget=0.25)
    tensors = [*model.relevance.parameters(), *model.relevance.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    optimized = {id(p) for group in model.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in model.relevance.parameters() if p.requires_grad} <= optimized
    vlm = arrcoc.attach_vlm(toy_vlm("llava").to("meta"), budget=0.25)
    assert {t.device.type for t in [*vlm.relevance.parameters(), *vlm.relevance.buffers()]} == {"meta"}
