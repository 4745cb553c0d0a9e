"""Data selection for a non-image model: an MLP on tabular float features, in a loop of your own.

    python examples/tabular_mlp.py --strategy infobatch
    python examples/tabular_mlp.py --strategy high_loss --server HOST:50051

The features are float vectors your own preprocessing already scaled; dataselect
needs nothing but the model's logits (and, for last-layer strategies, finds the final
nn.Linear by itself).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import dataselect


def make_data(n: int = 4000, features: int = 20, classes: int = 5, seed: int = 1):
    """Gaussian classes in feature space, 10 % of the labels flipped (so some samples are hard)."""
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(0)) * 0.6
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, features, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)
    return x, y


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--server", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.5)
    args = ap.parse_args(argv)

    x, y = make_data()
    x_test, y_test = make_data(1000, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    with dataselect.Session(args.strategy, model, fraction=args.fraction, epochs=args.epochs,
                            server=args.server) as session:
        loader = session.loader(torch.utils.data.TensorDataset(x, y), batch_size=64)
        for epoch in range(args.epochs):
            for xb, yb in loader:
                loss = session.loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    result = {"test_accuracy": accuracy, "samples_trained": session.costs.samples_trained,
              "scorer": "remote" if session.remote else "embedded", "selection_sha256": session.digest.hexdigest()}
    print(result)
    return result


if __name__ == "__main__":
    main()
