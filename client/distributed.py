"""Training on several processes: `torchrun` + DistributedDataParallel, one scoring session on rank 0.

`dataselect-train` started by `torchrun --nproc-per-node N` (WORLD_SIZE > 1 in the
environment) trains with DistributedDataParallel: gloo on CPU, NCCL on GPUs
(rank r uses cuda:LOCAL_RANK). The scheme, step by step:

* **Global batch.** `--batch-size` is per rank; a step trains on a global batch
  of `N × batch` samples, and in online mode the candidate pool of a step is
  `N × batch / select-fraction`. All ranks share the seed, so they draw the same
  shuffle and agree on every global pool without talking.
* **Each rank draws its own part of the pool** (positions r, r+N, ... of the
  global pool: ids, labels and inputs) and sends it to rank 0, which assembles
  the global pool (`DistributedScorer.select`).
* **One scorer, global budget.** Rank 0 alone holds the scoring session
  (in-process, one server, or several replicas with `--server a,b`) and scores
  the global pool with the global budget, so stateful strategies see every
  sample and the budget is exactly the single-process one. It broadcasts the
  selection (ids and weights) to every rank.
* **Disjoint shares.** Every rank holds the same selection; rank r trains on
  positions r, r+N, ... of each global batch (`share`), so the ranks train on
  disjoint samples and their gradients are averaged by DDP. A final remainder
  smaller than N (at most N-1 samples an epoch) is not trained on, so that every
  rank takes the same number of steps.
* **Reports** (training-side losses) are gathered to rank 0 and reported there;
  checkpoints are pushed from rank 0's unwrapped model.
* **Evaluation and outputs** on rank 0 only: it evaluates, broadcasts the
  figures, and alone writes metrics.jsonl, summary.json and checkpoint.pt. The
  summary's cost fields are totals over ranks (seconds are rank-seconds; `steps`
  counts optimiser steps, the same on every rank) and `per_rank` holds each
  rank's own figures.

The trade-off: scoring is centralised on rank 0 (the other ranks wait while it
scores; spread scoring over several servers with `--server a,b` to shorten
that wait), in exchange for a selection that is exactly the single-process one
and strategy state that lives in one place.

Scorer traffic uses its own gloo process group (it may run on the overlap
pipeline's thread), control traffic (budgets, evaluation, the summary) another,
so neither interleaves with the other or with DDP's gradient all-reduce.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dataselect import errors
from dataselect.client.remote import ServerUnavailable
from dataselect.client.scorer import ScoreReply, ScorerCounters
from dataselect.errors import DataselectError, InvalidArgument
from dataselect.strategy import Progress

#: Set to 1 to make rank 0 write `trained_ids.pt` ({rank: {epoch: ids trained}}) next to the summary.
RECORD_ENV = "DATASELECT_RECORD_TRAINED_IDS"

#: Per-rank figures gathered into the summary's `per_rank` and summed into its totals.
RANK_COSTS = ("train_seconds", "score_seconds", "server_compute_seconds", "transfer_seconds", "checkpoint_seconds",
              "eval_seconds", "data_seconds", "report_seconds", "irreducible_seconds", "samples_trained",
              "samples_scored")


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise InvalidArgument(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def rank() -> int:
    """This process's rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0") or 0) if world_size() > 1 else 0


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    ctrl: Any = None
    scorer_group: Any = None
    #: epoch (0-based) -> list of id tensors this rank trained on (only with RECORD_ENV=1).
    trained: dict[int, list[torch.Tensor]] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the training side ----------------------------------------------------------------
    def share(self, positions: torch.Tensor, weights: torch.Tensor | None, ids_of: Callable[[torch.Tensor], torch.Tensor],
              progress: Progress) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """This rank's disjoint part of a global batch; None (on every rank alike) when the batch
        has fewer samples than ranks, so that no rank steps on nothing."""
        if len(positions) < self.world:
            return None
        part = slice(self.rank, None, self.world)
        mine = positions[part]
        if self.trained is not None:
            self.trained.setdefault(int(progress.epoch), []).append(ids_of(mine).clone())
        return mine, None if weights is None else weights[part]

    def budget_reason(self, budget_samples: int | None, budget_seconds: float | None, samples_trained: int,
                      clock: Callable[[], float]) -> str | None:
        """The budget decision, agreed by all ranks: samples over all ranks, the slowest rank's clock."""
        if budget_samples is None and budget_seconds is None:
            return None
        mine = torch.tensor([float(samples_trained), clock() if budget_seconds is not None else 0.0],
                            dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.ctrl)
        stacked = torch.stack(every)
        if budget_samples is not None and float(stacked[:, 0].sum()) >= budget_samples:
            return "budget_samples"
        if budget_seconds is not None and float(stacked[:, 1].max()) >= budget_seconds:
            return "budget_seconds"
        return None

    def evaluate(self, evaluate_here: Callable[[], tuple[float, float]], costs: Any) -> tuple[float, float]:
        """Rank 0 evaluates; the others wait for its figures (their wait counts as evaluation)."""
        t0 = time.perf_counter()
        box = [evaluate_here() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        if not self.is_main:
            costs.eval_seconds += time.perf_counter() - t0
        return box[0]

    def gather_summary(self, summary: dict[str, Any], costs: Any, output: str | None,
                       per_rank_batch: int, selection_sha256: str) -> dict[str, Any]:
        """Every rank sends its own costs; rank 0's summary gets totals, `per_rank` and the world size."""
        mine = {"rank": self.rank, "device": str(self.device), **{k: getattr(costs, k) for k in RANK_COSTS},
                "steps": costs.steps, "selection_sha256": selection_sha256}
        trained = None
        if self.trained is not None:
            trained = {e: torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
                       for e, parts in self.trained.items()}
        box = [None] * self.world if self.is_main else None
        dist.gather_object((mine, trained), box, dst=0, group=self.ctrl)
        summary = dict(summary)
        summary["world_size"] = self.world
        summary["distributed_backend"] = self.backend
        summary["batch_size_per_rank"] = per_rank_batch
        summary["global_batch_size"] = per_rank_batch * self.world
        summary["config"] = {**summary.get("config", {}), "batch_size": per_rank_batch}
        if not self.is_main:
            summary["per_rank"] = [mine]
            return summary
        per_rank = [entry for entry, _ in box]
        for key in RANK_COSTS:
            summary[key] = sum(e[key] for e in per_rank)
        # One digest of the whole run's training: each rank's digest, in rank order.
        summary["selection_sha256"] = hashlib.sha256(
            "".join(f"{e['rank']}:{e['selection_sha256']}\n" for e in per_rank).encode()).hexdigest()
        summary["per_rank"] = per_rank
        if self.trained is not None and output:
            torch.save({e["rank"]: ids for e, (_, ids) in zip(per_rank, box)}, os.path.join(output, "trained_ids.pt"))
        return summary

    # -- the model --------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` (the trainer keeps the unwrapped one for
        evaluation, checkpoint pushes and resume points)."""
        if self.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.device.index], output_device=self.device.index)
        return DistributedDataParallel(model)


def setup(config: Any, *, resuming: bool = False) -> DistContext | None:
    """Join the torchrun process group when WORLD_SIZE > 1 (None otherwise).

    Each rank's device: `--device cpu` -> CPU with gloo; `auto` or `cuda` -> cuda:LOCAL_RANK with
    NCCL (auto without a GPU: CPU). Settings that cannot work are refused naming the fix.
    """
    world = world_size()
    if world <= 1:
        return None
    if resuming:
        raise InvalidArgument("--resume is not supported under torchrun yet: resume with one process "
                              "(dataselect-train --resume DIR) or start a new run")
    if getattr(config, "eval_every", None) is not None:
        raise InvalidArgument("--eval-every is not supported under torchrun yet (ranks must evaluate at the "
                              "same step); evaluate at epoch ends (leave --eval-every out)")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise InvalidArgument(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
                              "torchrun --nproc-per-node N --no-python dataselect-train ...")
    r = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = _rank_device(config.device, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=r, world_size=world)
        atexit.register(_teardown)
    ctx = DistContext(rank=r, world=world, local_rank=local, device=device, backend=backend,
                      ctrl=dist.new_group(backend="gloo"), scorer_group=dist.new_group(backend="gloo"))
    if os.environ.get(RECORD_ENV, "") not in ("", "0"):
        ctx.trained = {}
    return ctx


def per_rank_config(config: Any, ctx: DistContext | None) -> Any:
    """The configuration the epoch loops run with: the global batch (`N × --batch-size`; each rank
    trains on its share of it) and no progress bar off rank 0."""
    if ctx is None:
        return config
    return replace(config, batch_size=config.batch_size * ctx.world, progress=config.progress and ctx.is_main)


@contextmanager
def rank_zero_first(ctx: DistContext | None) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. downloads the dataset), then the others."""
    if ctx is not None and not ctx.is_main:
        dist.barrier(group=ctx.ctrl)
    yield
    if ctx is not None and ctx.is_main:
        dist.barrier(group=ctx.ctrl)


def _rank_device(requested: str, local: int) -> torch.device:
    req = (requested or "auto").strip().lower()
    if req == "cpu":
        return torch.device("cpu")
    if req == "mps":
        raise InvalidArgument("torchrun on --device mps is not supported (no distributed backend for mps); "
                              "use --device cpu")
    if req.startswith("cuda:"):
        raise InvalidArgument(f"--device {requested} under torchrun: each rank uses cuda:LOCAL_RANK; "
                              "pass --device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")
    if req not in ("auto", "cuda"):
        raise InvalidArgument(f"--device {requested!r} is not usable under torchrun; use cpu, cuda or auto")
    if not torch.cuda.is_available():
        if req == "cuda":
            raise InvalidArgument("--device cuda but no CUDA GPU is visible; use --device cpu (gloo)")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local >= count:
        raise InvalidArgument(f"LOCAL_RANK {local} needs cuda:{local}, but only {count} GPU(s) are visible; "
                              f"use --nproc-per-node {count} or fewer")
    return torch.device("cuda", local)


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- the scorer ------------------------------------------------------------------------------
_ERRORS: dict[str, type[DataselectError]] = {}


def _error_class(name: str) -> type[DataselectError]:
    if not _ERRORS:
        for obj in (*vars(errors).values(), ServerUnavailable):
            if isinstance(obj, type) and issubclass(obj, DataselectError):
                _ERRORS[obj.__name__] = obj
    return _ERRORS.get(name, DataselectError)


class DistributedScorer:
    """The `Scorer` interface on every rank, backed by one scorer on rank 0; see the module docstring.

    `select` takes the *global* pool and budget (the same on every rank), sends this rank's part
    of the pool to rank 0, and returns the whole selection, identical on every rank.
    """

    def __init__(self, ctx: DistContext, open_scorer: Callable[[], Any] | None):
        self.ctx = ctx
        self.inner = None
        self._counters = ScorerCounters()
        box: list[Any] = [None]
        if ctx.is_main:
            try:
                self.inner = open_scorer()
                box[0] = ("ok", self.inner.info)
            except BaseException as exc:
                box[0] = ("error", type(exc).__name__, str(exc))
                dist.broadcast_object_list(box, src=0, group=ctx.scorer_group)
                raise
        dist.broadcast_object_list(box, src=0, group=ctx.scorer_group)
        self.info = self._unbox(box[0], "opening the scoring session")

    @property
    def counters(self) -> ScorerCounters:
        return self.inner.counters if self.inner is not None else self._counters

    def _unbox(self, msg: tuple, what: str) -> Any:
        if msg[0] == "ok":
            return msg[1]
        _, name, text = msg
        raise _error_class(name)(f"{text} (rank 0, {what})")

    def push_checkpoint(self, model: nn.Module, version: int, step: int) -> None:
        if self.inner is not None:
            self.inner.push_checkpoint(getattr(model, "module", model), version, step)

    def push_state(self, state: dict[str, torch.Tensor], version: int, step: int) -> None:
        if self.inner is not None:
            self.inner.push_state(state, version, step)

    def push_irreducible(self, state: dict[str, torch.Tensor]) -> None:
        if self.inner is not None:
            self.inner.push_irreducible(state)

    def select(self, ids: torch.Tensor, inputs: torch.Tensor | None, labels: torch.Tensor, budget: int,
               progress: Progress, *, return_scores: bool = False) -> ScoreReply:
        ctx, g = self.ctx, self.ctx.scorer_group
        part = slice(ctx.rank, None, ctx.world)
        mine = (ids[part], labels[part], None if inputs is None else inputs[part])
        parts = [None] * ctx.world if ctx.is_main else None
        dist.gather_object(mine, parts, dst=0, group=g)
        box: list[Any] = [None]
        error: BaseException | None = None
        if ctx.is_main:
            try:
                pool_ids = torch.cat([p[0] for p in parts])
                pool_labels = torch.cat([p[1] for p in parts])
                pool_inputs = None if inputs is None else torch.cat([p[2] for p in parts])
                box[0] = ("ok", self.inner.select(pool_ids, pool_inputs, pool_labels, budget, progress,
                                                  return_scores=return_scores))
            except BaseException as exc:  # every rank must leave this call, with the same error
                error = exc
                box[0] = ("error", type(exc).__name__, str(exc))
        dist.broadcast_object_list(box, src=0, group=g)
        if error is not None:
            raise error
        reply = self._unbox(box[0], "scoring a pool")
        if not ctx.is_main:  # rank 0 accounts the scorer's compute and samples once
            reply = ScoreReply(selected_ids=reply.selected_ids, weights=reply.weights, scores=reply.scores,
                               checkpoint_version=reply.checkpoint_version, server_compute_seconds=0.0,
                               samples_scored=0, transfer_seconds=0.0)
        return reply

    def report(self, ids: torch.Tensor, losses: torch.Tensor, true_class_probs: torch.Tensor | None,
               correct: torch.Tensor | None, progress: Progress) -> None:
        ctx = self.ctx
        parts = [None] * ctx.world if ctx.is_main else None
        dist.gather_object((ids, losses, true_class_probs, correct), parts, dst=0, group=ctx.scorer_group)
        if ctx.is_main:
            def cat(k):
                return None if any(p[k] is None for p in parts) else torch.cat([p[k] for p in parts])

            self.inner.report(cat(0), cat(1), cat(2), cat(3), progress)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
