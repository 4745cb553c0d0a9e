"""What the server's boundary checks cost: each call timed with the checks and with them switched off,
in the same run, interleaved (a benchmark, not a unit test).

    python benchmarks/bench_boundary.py                 # cnn-small, 28x28, pools of 1,024
    python benchmarks/bench_boundary.py --repeats 30 --json out.json

Measured on an in-process CPU server (one torch thread):
* UploadCheckpoint: the trial forward with the new weights (and its key/shape/finiteness check) before
  they replace the session's;
* Select with float32 inputs: the magnitude check on the inputs (|x| <= 1e6);
* SelectStream of 8 chunks: the stream read on its own thread with an idle limit, against grpc's
  request iterator read directly.
Reports the median time of each call with and without the check, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _Passthrough:
    """The stream read directly (what the server did before it bounded idle streams)."""

    def __init__(self, requests, idle_seconds, method):
        self._requests = iter(requests)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._requests)

    def close(self):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--pool", type=int, default=1024)
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import grpc

    from dataselect import codec
    from dataselect.checkpoint import make_checkpoint, to_bytes
    from dataselect.models import build_model
    from dataselect.server import interceptors, serve, service
    from dataselect.v1 import selection_pb2 as pb
    from dataselect.v1 import selection_pb2_grpc as pb_grpc

    kwargs = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
    torch.manual_seed(0)
    data = to_bytes(make_checkpoint(args.model, kwargs, build_model(args.model, **kwargs)))
    n = args.pool
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    ids, labels = torch.arange(n), torch.randint(0, 10, (n,), generator=g)

    def select_req(sid, lo=0, hi=n, **kw):
        return pb.SelectRequest(session_id=sid, ids=codec.encode(ids[lo:hi]), inputs=codec.encode(x[lo:hi]),
                                labels=codec.encode(labels[lo:hi]), **kw)

    times: dict[str, dict[str, list[float]]] = {}
    with serve(port=0, workers=1, max_message_bytes=64 * 2**20) as running, \
            grpc.insecure_channel(running.address, options=[("grpc.max_send_message_length", 64 * 2**20)]) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = stub.OpenSession(pb.OpenSessionRequest(strategy="high_loss", num_classes=10, model=pb.ModelSpec(
            name=args.model, kwargs_json=json.dumps(kwargs))), timeout=60).session_id

        def upload():
            stub.UploadCheckpoint(iter([pb.CheckpointChunk(session_id=sid, version=1, data=data)]), timeout=60)

        def select():
            stub.Select(select_req(sid, budget=n // 8), timeout=300)

        def stream():
            step = n // 8
            stub.SelectStream(iter([pb.SelectRequest(session_id=sid, budget=n // 8)]
                                   + [select_req(sid, i, i + step) for i in range(0, n, step)]), timeout=300)

        calls = {"UploadCheckpoint (trial forward)": upload,
                 "Select, float32 inputs (magnitude check)": select,
                 "SelectStream, 8 chunks (idle-limited reader)": stream}
        for name, fn in calls.items():
            fn()  # warm up both paths
            with _switch_off(name, service, interceptors):
                fn()
            times[name] = {"checked": [], "unchecked": []}
        for r in range(args.repeats):
            for name, fn in calls.items():
                order = ("checked", "unchecked") if r % 2 == 0 else ("unchecked", "checked")
                for variant in order:
                    t0 = time.perf_counter()
                    if variant == "checked":
                        fn()
                    else:
                        with _switch_off(name, service, interceptors):
                            fn()
                    times[name][variant].append(time.perf_counter() - t0)

    results = []
    print(f"{args.model}, pool {n}, {args.repeats} repeats, medians; "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPU cores")
    print("| call | with the check (ms) | without (ms) | ratio |")
    print("|---|---|---|---|")
    for name, t in times.items():
        on, off_ = statistics.median(t["checked"]) * 1000, statistics.median(t["unchecked"]) * 1000
        results.append({"call": name, "checked_ms": on, "unchecked_ms": off_, "ratio": on / off_})
        print(f"| {name} | {on:.1f} | {off_:.1f} | {on / off_:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


@contextmanager
def _switch_off(name, service, interceptors):
    if name.startswith("UploadCheckpoint"):
        with patched(service.SelectionServicer, "_trial_forward", lambda self, *a, **k: None):
            yield
    elif name.startswith("Select,"):
        with patched(service, "check_magnitude", lambda *a, **k: None):
            yield
    else:
        with patched(interceptors, "StreamReader", _Passthrough):
            yield


if __name__ == "__main__":
    sys.exit(main())
