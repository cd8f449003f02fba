"""Can the canvas VLM's language model learn canvas VQA when its tower is perfect? (issue 38's quick check)

The language model and projector of :func:`~arrcoc.models.canvas_vlm.build_canvas_vlm` learn the VQA answers as
``train_vlm`` teaches them, from *symbolic* patch features instead of the tower's: each patch's one-hot digit,
colour and box centre (``train_vlm.patch_targets``), optionally averaged ``--pool`` x ``--pool`` into fewer
visual tokens (cheap steps; pooling merges neighbouring digits, so local questions lose some of their answers;
several ``--pool`` sizes: a curriculum from few visual tokens to many).
``--noise`` replaces that share of the digit-patch labels with a wrong digit (a tower of that per-patch accuracy).
``--init-std`` re-draws the language model's and projector's weights at another scale (transformers' default is
0.02). Prints answer accuracy per question kind on test canvases (training and held-out phrasings) as it goes::

    python benchmarks/vlm_symbolic_probe.py --pool 4 --steps 2400
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from arrcoc.bench.train_vlm import (
    accuracy_by_kind,
    as_uint8,
    dialogue_prompts,
    embedded_prompts,
    patch_targets,
    pooled_tokens,
    positions,
)
from arrcoc.data.vqa import VQAConfig, ask, vqa_split
from arrcoc.models.canvas_vlm import CanvasVLMConfig, build_canvas_vlm, canvas_prompts, canvas_tokenizer
from arrcoc.optim import warmup_cosine


def symbolic_features(batch, noise: float, generator: torch.Generator, where: bool = False) -> torch.Tensor:
    """(N, 256, 128): each patch's one-hot digit (10: none), colour and centre flag (and with ``where`` its row and
    column, one-hot, as a tower's position embedding gives them)."""
    targets = patch_targets(batch, 16, 8)
    digit = targets["digit"]
    wrong = (torch.rand(digit.shape, generator=generator) < noise) & (digit < 10)
    digit = torch.where(wrong, (digit + torch.randint(1, 10, digit.shape, generator=generator)) % 10, digit)
    colors = len(VQAConfig().canvas.colors) + 1
    features = torch.zeros(len(batch), 256, 128)
    features[..., :11] = F.one_hot(digit, 11).float()
    features[..., 11:11 + colors] = F.one_hot(targets["color"].remainder(colors), colors).float()
    features[..., 11 + colors] = targets["centre"]
    if where:
        cells = torch.arange(256)
        features[:, cells, 12 + colors + cells // 16] = 1.0
        features[:, cells, 28 + colors + cells % 16] = 1.0
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, nargs="+", default=[4], choices=(1, 2, 4, 8),
                        help="visual tokens averaged over pool x pool patches; several: a curriculum, in turn")
    parser.add_argument("--shares", type=float, nargs="+", default=None,
                        help="the share of the steps each --pool takes (default: equal)")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--questions", type=int, default=1, help="questions per canvas in one training sequence")
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--init-std", type=float, default=None)
    parser.add_argument("--canvases", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rope-theta", type=float, default=CanvasVLMConfig.rope_theta)
    parser.add_argument("--where", action="store_true", help="each patch's row and column in its features")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    tokenizer = canvas_tokenizer()
    train = as_uint8(vqa_split("train", args.canvases, seed=0))
    tests = {"training phrasings": as_uint8(vqa_split("test", 300, seed=0, config=VQAConfig())),
             "held-out phrasings": as_uint8(vqa_split("test", 300, seed=0))}
    shares = args.shares or [1 / len(args.pool)] * len(args.pool)
    if len(shares) != len(args.pool):
        raise ValueError(f"give one --shares per --pool, got {shares} for {args.pool}")
    phase_ends = [round(args.steps * sum(shares[:i + 1]) / sum(shares)) for i in range(len(shares))]
    patches = symbolic_features(train, args.noise, generator, args.where)
    test_patches = {name: symbolic_features(batch, args.noise, generator, args.where) for name, batch in tests.items()}
    model = build_canvas_vlm(CanvasVLMConfig(rope_theta=args.rope_theta), tokenizer)
    if args.init_std is not None:
        for module in [*model.model.language_model.modules(), *model.model.multi_modal_projector.modules()]:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=args.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "vision_tower" not in n], lr=args.lr,
                                  weight_decay=0.0)
    schedule = warmup_cosine(optimizer, args.steps, 0.05 * args.steps)
    order, epoch, start = [], 0, time.perf_counter()
    for step in range(args.steps):
        if step in (0, *phase_ends[:-1]):
            pool = args.pool[[step < end for end in phase_ends].index(True)]
            features = pooled_tokens(patches, pool)
            test_features = {name: pooled_tokens(f, pool) for name, f in test_patches.items()}
        if not order:
            asked = [ask(train, 1000 * epoch + q) for q in range(args.questions)]
            order, epoch = list(torch.randperm(len(train), generator=generator).split(32)), epoch + 1
        rows = order.pop()
        turns = [[(a.questions[r], a.answers[r]) for a in asked] for r in rows.tolist()]
        prompts = dialogue_prompts(tokenizer, turns, features.shape[1], 0.1, generator)
        model.train()
        loss = model(inputs_embeds=embedded_prompts(model, features[rows], prompts),
                     attention_mask=prompts["attention_mask"], position_ids=positions(prompts["attention_mask"]),
                     labels=prompts["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, args.steps // 6) == 0:
            model.eval()
            shown = []
            for name, batch in tests.items():
                prompts = canvas_prompts(tokenizer, batch.questions, features.shape[1])
                with torch.no_grad():
                    logits = model(inputs_embeds=embedded_prompts(model, test_features[name], prompts),
                                   attention_mask=prompts["attention_mask"],
                                   position_ids=positions(prompts["attention_mask"])).logits[:, -1]
                accuracy = accuracy_by_kind(tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), batch)
                shown.append(f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in accuracy.items()))
            seconds = time.perf_counter() - start
            print(f"step {step + 1} ({features.shape[1]} tokens), loss {loss.item():.3f}, {seconds:.0f} s | "
                  + " | ".join(shown), flush=True)


if __name__ == "__main__":
    main()
