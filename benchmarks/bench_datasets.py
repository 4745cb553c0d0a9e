"""Data paths of dataselect.datasets, as ratios against baselines measured in the same run.

1. Training augmentation of an in-memory uint8 batch (CIFAR-10 crop 32 pad 4 + flip):
   `DataSource.augment_batch` (vectorised) against torchvision's v2 transforms applied
   per image, the usual way.
2. One epoch of a lazily loaded ImageFolder (generated PNGs) through a DataLoader with
   0 and with `--workers` workers, against reading the same images into memory once.

    python benchmarks/bench_datasets.py [--batch 256] [--images 2000] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def augmentation(batch_size: int, repeats: int) -> dict:
    import torchvision.transforms.v2 as T

    from dataselect.datasets import RandomCropFlip

    x = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = RandomCropFlip(32, 4)
    theirs = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    gen = torch.Generator().manual_seed(1)
    t_ours = best_of(lambda: ours(x, gen), repeats)
    t_theirs = best_of(lambda: torch.stack([theirs(img) for img in x]), max(3, repeats // 4))
    return {"batch": batch_size, "augment_batch_ms": round(t_ours * 1e3, 3),
            "torchvision_per_image_ms": round(t_theirs * 1e3, 3), "speedup": round(t_theirs / t_ours, 2)}


def imagefolder_epoch(n_images: int, workers: int) -> dict:
    from PIL import Image

    from dataselect.datasets import open_dataset

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(n_images):
            path = Path(tmp) / "train" / f"class{i % 10}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        source = open_dataset(f"imagefolder:{tmp}", seed=0)

        def epoch(num_workers: int) -> float:
            loader = torch.utils.data.DataLoader(source.train, batch_size=128, shuffle=True, num_workers=num_workers)
            start = time.perf_counter()
            for _ in loader:
                pass
            return time.perf_counter() - start

        start = time.perf_counter()
        images = torch.stack([source.train_plain[i][0] for i in range(len(source.train_plain))])
        t_read = time.perf_counter() - start
        t0 = epoch(0)
        tw = epoch(workers)
    return {"images": len(images), "read_into_memory_s": round(t_read, 3), "epoch_0_workers_s": round(t0, 3),
            f"epoch_{workers}_workers_s": round(tw, 3), "epoch_0_workers_over_read": round(t0 / t_read, 2),
            f"epoch_{workers}_workers_over_read": round(tw / t_read, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"augmentation": augmentation(args.batch, args.repeats),
              "imagefolder": imagefolder_epoch(args.images, args.workers)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    a, f = result["augmentation"], result["imagefolder"]
    print(f"augment {a['batch']} CIFAR images: augment_batch {a['augment_batch_ms']} ms, torchvision v2 per image "
          f"{a['torchvision_per_image_ms']} ms: {a['speedup']}x faster")
    print(f"imagefolder epoch of {f['images']} images, relative to reading them into memory once "
          f"({f['read_into_memory_s']} s): 0 workers {f['epoch_0_workers_over_read']}x, "
          f"{args.workers} workers {f[f'epoch_{args.workers}_workers_over_read']}x")


if __name__ == "__main__":
    main()
