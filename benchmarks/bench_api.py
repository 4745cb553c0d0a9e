"""What the public API costs per training step, against calling the scorer directly.

Both loops train the same model on the same pools with the same strategy
(online, embedded scoring, push every step):

* `direct`: a hand-written loop over `dataselect.client.scorer.EmbeddedScorer`:
  draw a pool, push the weights, Select, map the ids back to rows, train with
  the weights;
* `api`: the README loop, `Session.loader` + `Session.loss`.

Rounds alternate between the two (so a busy machine slows both alike) and
the result is the ratio of the median seconds per step. The API's target is
at most 1.02.

    python benchmarks/bench_api.py --rounds 7 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dataselect
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.plugins.base import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine  # noqa: E402


def data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


KW = dict(num_classes=10, in_channels=1, image_size=28, mean=[0.5], std=[0.25])


def direct(args, x, y) -> float:
    torch.manual_seed(0)
    model = dataselect.build_model(args.model, **KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scorer = EmbeddedScorer(SessionSpec(strategy=args.strategy, options={}, model_name=args.model, model_kwargs=KW,
                                        num_classes=10), device="cpu")
    pool = round(args.batch / args.fraction)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = order[step * pool:(step + 1) * pool]
        scorer.push_checkpoint(model, step + 1, step)
        reply = scorer.select(ids, x[ids], y[ids], args.batch, Progress(step=step))
        chosen = reply.selected_ids
        logits = model(x[chosen])
        per_sample = F.cross_entropy(logits, y[chosen], reduction="none")
        loss = per_sample.mean() if reply.weights is None else (per_sample * reply.weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    scorer.close()
    return seconds / args.steps


def api(args, x, y) -> float:
    torch.manual_seed(0)
    model = dataselect.build_model(args.model, **KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    session = dataselect.Session(args.strategy, model, fraction=args.fraction, device="cpu")
    n = round(args.batch / args.fraction) * args.steps
    loader = session.loader(torch.utils.data.TensorDataset(x[:n], y[:n]), batch_size=args.batch)
    t0 = time.perf_counter()
    for xb, yb in loader:
        loss = session.loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    session.close()
    return seconds / args.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = data(round(args.batch / args.fraction) * args.steps)
    direct(args, x, y), api(args, x, y)  # warm both paths up (allocator, first-call costs)
    times: dict[str, list[float]] = {"direct": [], "api": []}
    for r in range(args.rounds):
        for name, fn in ((("direct", direct), ("api", api)) if r % 2 == 0 else (("api", api), ("direct", direct))):
            times[name].append(fn(args, x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"machine": machine(), "args": vars(args), "seconds_per_step": med, "ratio_api_to_direct": med["api"] / med["direct"],
           "rounds": times}
    print(f"{args.strategy} on {args.model}, batch {args.batch}, fraction {args.fraction}, {args.steps} steps x "
          f"{args.rounds} rounds: direct {1000 * med['direct']:.2f} ms/step, api {1000 * med['api']:.2f} ms/step, "
          f"ratio {out['ratio_api_to_direct']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
