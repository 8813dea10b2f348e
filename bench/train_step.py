"""Training-step time, two variants measured side by side in one run: fp32 vs bf16 autocast
(--compare precision, the default), or our CPU dropout mask (layers.Dropout) vs F.dropout
(--compare dropout, fp32).

One model of a named size, random weights and random token batches of --batch-tokens (sized
as the train loop does: max(source, target) + 1 tokens per sentence), the AT demonstrator's loss (eq 14)
and, with --student, the imitate-NAT's (eq 15, frozen AT forward included). Each precision is
timed for --steps optimizer steps after --warmup untimed ones, alternating between the two
variants --rounds times; the median step time per variant is reported with the ratio.
bf16 is what `precision: bf16` does under `strategy: ddp` (torch.autocast; weights and Adam
stay fp32). A benchmark, not a test.

    python bench/train_step.py                      # small preset, 2,048 tokens, CPU threads = cores
    python bench/train_step.py --size tiny --threads 1 --student
    python bench/train_step.py --size tiny --vocab 1000 --threads 2 --compare dropout
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imitate_nat import layers  # noqa: E402
from imitate_nat import ATDemonstrator, LossConfig, NATLearner  # noqa: E402
from imitate_nat.config import PRESETS, preset  # noqa: E402
from imitate_nat.data import make_batch  # noqa: E402
from imitate_nat.losses import at_loss, nat_loss  # noqa: E402
from imitate_nat.optim import make_optimizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--student", action="store_true", help="time the imitate-NAT step (with the frozen AT)")
    p.add_argument("--compare", default="precision", choices=["precision", "dropout"],
                   help="precision: fp32 vs bf16 autocast; dropout: F.dropout vs layers.Dropout's CPU mask (fp32)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and precision")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def random_batch(batch_tokens: int, vocab: int, rng: random.Random):
    """Sentences of 8-20 source tokens, the target one longer, until the batch holds batch_tokens."""
    srcs, tgts, n = [], [], 0
    while n < batch_tokens:
        length = rng.randint(8, 20)
        srcs.append([rng.randint(4, vocab - 1) for _ in range(length)])
        tgts.append([rng.randint(4, vocab - 1) for _ in range(length + 1)])
        n += length + 2  # max(source, target) + 1, as training counts (imitate_nat.indexed.pair_lengths)
    return make_batch(srcs, tgts)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    cfg = preset(a.size, vocab_size=a.vocab)
    batch = random_batch(a.batch_tokens, a.vocab, random.Random(a.seed)).to(device)
    losses = LossConfig()
    at = ATDemonstrator(cfg).to(device)
    if a.student:
        teacher = at.eval().requires_grad_(False)
        model = NATLearner(cfg).to(device)
        model.init_from_at(teacher)
        loss_fn = lambda: nat_loss(model, batch, losses, teacher)[0]  # noqa: E731
    else:
        model = at
        loss_fn = lambda: at_loss(model, batch, losses)[0]  # noqa: E731
    optimizer = make_optimizer(model.parameters(), 5e-4)

    fast_dropout = layers.Dropout.forward

    def torch_dropout(self, x):
        return F.dropout(x, self.p, self.training)

    # variant name -> (bf16 autocast, Dropout.forward)
    variants = ({"fp32": (False, fast_dropout), "bf16 autocast": (True, fast_dropout)} if a.compare == "precision"
                else {"F.dropout": (False, torch_dropout), "CPU mask": (False, fast_dropout)})

    def step(name: str) -> float:
        bf16, layers.Dropout.forward = variants[name]
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in variants:
        for _ in range(a.warmup):
            step(name)
    times = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name in variants:
            times[name] += [step(name) for _ in range(a.steps)]
    layers.Dropout.forward = fast_dropout
    (base, base_s), (new, new_s) = ((n, statistics.median(t)) for n, t in times.items())
    kind = "imitate-NAT (eq 15)" if a.student else "AT demonstrator (eq 14)"
    print(f"# train step: {kind}, size={a.size}, vocab={a.vocab}, {a.batch_tokens} tokens, {a.device}, "
          f"threads={torch.get_num_threads()}, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{base:15} {base_s * 1000:8.0f} ms/step")
    print(f"{new:15} {new_s * 1000:8.0f} ms/step")
    print(f"speedup         {base_s / new_s:8.2f}x  (median of {len(times[base])} steps each, interleaved)")
    return {"variants": [base, new], "base_s": base_s, "new_s": new_s, "speedup": base_s / new_s}


if __name__ == "__main__":
    main()
