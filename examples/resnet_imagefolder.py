"""A plain PyTorch training loop with an unmodified torchvision ResNet-18 on an ImageFolder, gaining
data selection from dataselect (the lines marked `# dataselect`).

    python examples/resnet_imagefolder.py --data DIR                         # scored in-process
    python examples/resnet_imagefolder.py --data DIR --server HOST:50051     # scored on dataselect-server

DIR holds train/<class>/*.png and test/<class>/*.png. On a server the model travels as a
`torch.export` program: the server needs no code for it.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

import dataselect  # dataselect


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and test/")
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--server", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="images are resized to SIZE x SIZE")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    tf = transforms.Compose([transforms.Resize((args.size, args.size)), transforms.ToTensor(),
                             transforms.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])])
    train_set = torchvision.datasets.ImageFolder(f"{args.data}/train", transform=tf)
    test_set = torchvision.datasets.ImageFolder(f"{args.data}/test", transform=tf)
    model = torchvision.models.resnet18(num_classes=len(train_set.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    session = dataselect.Session(args.strategy, model, epochs=args.epochs, server=args.server)  # dataselect
    loader = session.loader(train_set, batch_size=args.batch_size, num_workers=args.workers)  # dataselect
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = session.loss(model(x), y)  # dataselect: was F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    session.close()  # dataselect

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=64):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    result = {"test_accuracy": correct / max(1, total), "samples_trained": session.costs.samples_trained,
              "samples_scored": session.costs.samples_scored, "scorer": "remote" if session.remote else "embedded",
              "selection_sha256": session.digest.hexdigest()}
    print(result)
    return result


if __name__ == "__main__":
    main()
