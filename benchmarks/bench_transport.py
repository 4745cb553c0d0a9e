"""Transport overhead: one Select over loopback gRPC vs the same scoring in-process.

    python benchmarks/bench_transport.py --data-dir ../shared/datasets [--pool 4096] [--repeats 7]

A pool of `--pool` real MNIST training images (uint8, as the trainer sends
them) is scored with `--strategy` (high_loss) and half of it selected, both

* in-process: `EmbeddedScorer.select` (the trainer's embedded mode), and
* remote: `RemoteScorer.select` against a `dataselect-server --device cpu
  --threads N` subprocess on the same machine (loopback TCP),

alternating the two in each repeat so that drifting machine load hits both.
Both hold `--threads` torch threads and score with the same engine defaults.
Reported: median wall seconds of each, their ratio (target <= 1.15), the bytes
per sample on the wire (`SelectRequest.ByteSize()` / pool, and the response),
and where the remote call's extra time goes (client encode, server decode +
encode, gRPC/wire, client decode), measured by calling the stub directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import median, server_process  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="folder holding MNIST (default: $DATASELECT_DATA or the cache)")
    ap.add_argument("--pool", type=int, default=4096)
    ap.add_argument("--fraction", type=float, default=0.5, help="share of the pool selected")
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    from dataselect import codec
    from dataselect.datasets import open_dataset
    from dataselect.client.remote import RemoteScorer, _progress_msg
    from dataselect.client.scorer import EmbeddedScorer, SessionSpec
    from dataselect.models import build_model
    from dataselect.plugins.base import Progress
    from dataselect.v1 import selection_pb2 as pb

    torch.set_num_threads(args.threads)
    data = open_dataset("mnist", args.data_dir, download=False, train_subset=args.pool)
    ids, x, y = data.train_tensors.ids, data.train_tensors.inputs, data.train_tensors.labels
    budget = max(1, int(args.pool * args.fraction))
    kwargs = data.info.model_kwargs()
    spec = SessionSpec(args.strategy, {}, args.model, kwargs, num_classes=data.info.num_classes, seed=0,
                       dataset="mnist", dataset_size=60_000)
    torch.manual_seed(0)
    model = build_model(args.model, **kwargs)
    progress = Progress(epoch=0, step=1, total_epochs=1)

    embedded = EmbeddedScorer(spec, device="cpu", micro_batch="auto")
    embedded.push_checkpoint(model, 1, 0)
    rows = {"in-process": [], "remote": []}
    compute = {"in-process": [], "remote": []}
    with server_process(threads=args.threads) as server, RemoteScorer(server.address, spec, retry_seconds=0) as remote:
        remote.push_checkpoint(model, 1, 0)
        runners = {"in-process": embedded, "remote": remote}
        selections = {}
        for name, scorer in runners.items():  # warm-up (allocator, first-call costs), not timed
            selections[name] = scorer.select(ids, x, y, budget, progress).selected_ids
        same = torch.equal(selections["in-process"].sort().values, selections["remote"].sort().values)
        for r in range(args.repeats):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                t0 = time.perf_counter()
                reply = runners[name].select(ids, x, y, budget, progress)
                rows[name].append(time.perf_counter() - t0)
                compute[name].append(reply.server_compute_seconds)
            print(f"repeat {r + 1}/{args.repeats}: in-process {rows['in-process'][-1]:.3f}s, "
                  f"remote {rows['remote'][-1]:.3f}s", file=sys.stderr)

        # Where the remote call's time goes: the same Select through the stub, phase by phase.
        phases = {k: [] for k in ("encode", "call", "server_compute", "server_codec", "server_queue", "decode")}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            request = pb.SelectRequest(session_id=remote.info.session_id, budget=budget,
                                       progress=_progress_msg(progress), **remote._pool(ids, x, y))
            t1 = time.perf_counter()
            response = remote._stub.Select(request, timeout=600)
            t2 = time.perf_counter()
            codec.decode(response.selected_ids, name="selected_ids").clone()
            t3 = time.perf_counter()
            phases["encode"].append(t1 - t0)
            phases["call"].append(t2 - t1)
            phases["decode"].append(t3 - t2)
            phases["server_compute"].append(response.cost.compute_seconds)
            phases["server_codec"].append(response.cost.codec_seconds)
            phases["server_queue"].append(response.cost.queue_seconds)
        request_bytes, response_bytes = request.ByteSize(), response.ByteSize()

    # What the server does with the bytes: parse, then codec.decode (torch.frombuffer on the payload).
    wire = request.SerializeToString()
    parse, decode = [], []
    for _ in range(max(5, args.repeats)):
        t0 = time.perf_counter()
        msg = pb.SelectRequest.FromString(wire)
        t1 = time.perf_counter()
        codec.decode(msg.inputs, name="inputs")
        decode.append(time.perf_counter() - t1)
        parse.append(t1 - t0)
    payload = msg.inputs.data
    shared = torch.frombuffer(payload, dtype=torch.uint8).data_ptr() == np.frombuffer(payload, np.uint8).ctypes.data

    med = {k: median(v) for k, v in rows.items()}
    ratio = med["remote"] / med["in-process"]
    pair_ratio = median([b / a for a, b in zip(rows["in-process"], rows["remote"])])
    ph = {k: median(v) for k, v in phases.items()}
    grpc_wire = ph["call"] - ph["server_compute"] - ph["server_codec"] - ph["server_queue"]
    result = {
        "pool": args.pool, "budget": budget, "model": args.model, "strategy": args.strategy, "threads": args.threads,
        "repeats": args.repeats, "in_process_seconds": med["in-process"], "remote_seconds": med["remote"],
        "ratio_of_medians": ratio, "median_pair_ratio": pair_ratio, "target": 1.15,
        "in_process_compute_seconds": median(compute["in-process"]),
        "server_compute_seconds": median(compute["remote"]),
        "request_bytes": request_bytes, "response_bytes": response_bytes,
        "request_bytes_per_sample": request_bytes / args.pool, "response_bytes_per_sample": response_bytes / args.pool,
        "raw_bytes_per_sample": (x[0].numel() * x.element_size()) + 16,
        "phases_seconds": ph, "grpc_and_wire_seconds": grpc_wire,
        "server_parse_seconds": median(parse), "server_decode_seconds": median(decode),
        "frombuffer_shares_memory": shared, "same_selection": same,
    }

    print(f"\n{args.strategy}, {args.model}: Select of {args.pool:,} MNIST samples (budget {budget:,}), "
          f"{args.threads} torch thread(s) per process, median of {args.repeats}\n")
    print("| path | wall s | scoring compute s |")
    print("|---|---:|---:|")
    print(f"| in-process (EmbeddedScorer) | {med['in-process']:.3f} | {result['in_process_compute_seconds']:.3f} |")
    print(f"| loopback gRPC (RemoteScorer → dataselect-server) | {med['remote']:.3f} | "
          f"{result['server_compute_seconds']:.3f} |")
    verdict = "ok" if ratio <= 1.15 else "MISSED"
    print(f"\nratio remote / in-process: **{ratio:.3f}×** (median of per-repeat ratios {pair_ratio:.3f}×; "
          f"target ≤ 1.15×: {verdict}); same selection: {same}\n")
    print("| on the wire | bytes | bytes / sample |")
    print("|---|---:|---:|")
    print(f"| SelectRequest | {request_bytes:,} | {request_bytes / args.pool:.1f} |")
    print(f"| SelectResponse | {response_bytes:,} | {response_bytes / args.pool:.1f} |")
    print(f"| raw pool (pixels + int64 id + int64 label) | {args.pool * result['raw_bytes_per_sample']:,} | "
          f"{result['raw_bytes_per_sample']:.1f} |")
    print("\n| remote call, phase (stub) | median ms |")
    print("|---|---:|")
    for label, value in (("client: build + encode SelectRequest", ph["encode"]),
                         ("server: scoring compute", ph["server_compute"]),
                         ("server: decode request + encode response", ph["server_codec"]),
                         ("server: queue wait", ph["server_queue"]),
                         ("gRPC: serialise, loopback, parse, threads", grpc_wire),
                         ("client: decode response", ph["decode"])):
        print(f"| {label} | {value * 1e3:.2f} |")
    print(f"\nserver side, measured here: parse {median(parse) * 1e3:.2f} ms, codec.decode {median(decode) * 1e3:.2f} ms; "
          f"torch.frombuffer shares the payload's memory: {shared}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
