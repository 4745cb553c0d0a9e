"""`ReplicatedScorer`: one scoring session spread over several `dataselect-server` replicas.

`dataselect-train --server host1:port,host2:port` scores each candidate pool on
all replicas at once: the pool is split into shards by sample id, each shard is
scored by one replica (in parallel threads: gRPC releases the GIL while it
waits), and the shards' results are merged into one selection whose size is
the *global* budget.

Where a sample's state lives. Shards are cut by rendezvous hashing of the id
over the *configured* replica list: every id has a fixed preference order of
replicas and goes to the first live one. While all replicas are up an id
always goes to the same replica, so whatever a stateful strategy keeps per
sample (selective backprop's loss history, importance sampling's EMA,
InfoBatch's last loss, MRMC's loss curves) is kept by that replica's session,
and Reports for an id go to the replica that scores it. When a replica goes
down only *its* ids move, spread evenly over the others (the state for those
ids starts afresh there, as after a single-server restart); the other ids
stay where they are.

How the budget stays global:

* `exact` merge — strategies whose selection is the default "score, then
  apply the policy" (`select_kind = "score_then_policy"`: high_loss,
  high_gradient, high_influence and plugins built the same way). Each replica
  returns its shard's scores; the client puts them back in pool order and
  applies the policy (topk, class_balanced, threshold or sample) to the whole
  pool. For scores that depend only on the sample (all built-in ones) this is
  exactly the selection a single server would make (the `sample` policy draws
  from the client's own generator, seeded with the session seed).
* `proportional` merge — strategies with their own selection logic (random,
  selective_backprop, importance_sampling, infobatch, dynams, mrmc, glister). Each
  replica runs the strategy on its shard with a budget proportional to the
  shard's size (largest remainders, so the shares sum to exactly the budget).
  Hashed shards are uniform random samples of the pool, so this approximates
  the single-server selection; it is what per-replica state allows (the
  state needed to select an id lives on its replica only).

Failures. Each replica is a `RemoteScorer` with a short reconnect budget
(`replica_retry_seconds`): a replica that stays unreachable that long is
marked down (one warning, `counters.extra["replicas_down"]`), and its shard of
the call in flight is re-hashed onto the live replicas and scored there, so
training goes on. Every `revive_seconds` a checkpoint push tries the down
replicas again; one that answers gets a new session and the latest weights,
and takes its ids back. With no replica left: `on_server_failure="fallback"`
scores in-process for the rest of the run; "retry" keeps trying to revive
replicas for `retry_seconds` and then fails.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dataselect.client.remote import RemoteScorer, ServerUnavailable, address_error
from dataselect.client.scorer import (
    EmbeddedScorer,
    ScoreReply,
    ScorerCounters,
    SessionInfo,
    SessionSpec,
    average_diagnostics,
)
from dataselect.errors import DataselectError, InvalidArgument, PluginError
from dataselect.names import ON_SERVER_FAILURE
from dataselect.policies import apply_policy
from dataselect.registry import get_strategy
from dataselect.strategy import Progress

log = logging.getLogger("dataselect.client")

MERGES = ("exact", "proportional")


def parse_servers(text: str) -> list[str]:
    """`"host1:port,host2:port"` -> the list of addresses, or InvalidArgument naming the bad entry."""
    entries = [e.strip() for e in str(text).split(",")]
    if not any(entries):
        raise InvalidArgument("--server is empty; give HOST:PORT, or several as host1:50051,host2:50051")
    out: list[str] = []
    for k, entry in enumerate(entries, 1):
        where = f"entry {k} of --server {text!r}" if len(entries) > 1 else f"--server {text!r}"
        if not entry:
            raise InvalidArgument(f"{where} is empty; separate replicas with single commas: host1:50051,host2:50051")
        problem = address_error(entry)
        if problem is not None:
            raise InvalidArgument(f"{where}: {problem}; for several replicas write host1:50051,host2:50051")
        if entry in out:
            raise InvalidArgument(f"{where}: {entry!r} is listed twice; name each replica once")
        out.append(entry)
    return out


# -- sharding ------------------------------------------------------------------------------
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-spread hash of uint64 (wrapping arithmetic)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def owners(ids: torch.Tensor, n_replicas: int, live: list[bool] | None = None) -> torch.Tensor:
    """Replica index (into the configured list) that owns each id: rendezvous hashing.

    Each (id, replica) pair gets a pseudo-random weight; an id belongs to the live
    replica with the largest weight. Ownership therefore depends only on the id and
    the configured list, and a replica going down moves only its own ids.
    """
    live = [True] * n_replicas if live is None else list(live)
    if not any(live):
        raise DataselectError("no live scoring replica")
    h = _mix(ids.detach().cpu().numpy().astype(np.int64).view(np.uint64))
    salts = _mix((np.arange(1, n_replicas + 1, dtype=np.uint64) * _GOLDEN))
    weights = _mix(h[:, None] ^ salts[None, :])
    weights[:, [j for j in range(n_replicas) if not live[j]]] = 0
    return torch.from_numpy(weights.argmax(axis=1).astype(np.int64))


def apportion(budget: int, sizes: list[int]) -> list[int]:
    """Split `budget` over shards proportionally to `sizes`, largest remainders first.

    The shares sum to exactly `budget` (when budget <= sum(sizes)) and none exceeds its size.
    """
    total = sum(sizes)
    if total <= 0:
        return [0] * len(sizes)
    exact = [budget * s / total for s in sizes]
    shares = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (exact[i] - shares[i], sizes[i]), reverse=True)
    for i in order[:budget - sum(shares)]:
        shares[i] += 1
    return shares


def merge_kind(strategy: str) -> str:
    """"exact" when the strategy's selection is score-then-policy (scores can be merged), else "proportional"."""
    return "exact" if get_strategy(strategy).select_kind == "score_then_policy" else "proportional"


class _ReplicaDown(Exception):
    def __init__(self, index: int, cause: BaseException):
        super().__init__(str(cause))
        self.index, self.cause = index, cause


class ReplicatedScorer:
    """The `Scorer` interface over several `dataselect-server` replicas; see the module docstring.

    Args:
        addresses: "HOST:PORT" of each replica (the order fixes where ids live).
        spec: the session every replica opens.
        connect: `connect(address, retry_seconds, connect_timeout)` -> a scorer for one replica
            (default: a `RemoteScorer` with `remote_kwargs`).
        replica_retry_seconds: how long one replica may stay unreachable before it is marked down.
        retry_seconds: with every replica down and on_server_failure="retry", how long to keep
            trying to bring one back before failing.
        on_server_failure: "retry" or "fallback" (score in-process once no replica is left).
        revive_seconds: try a down replica again this often (on checkpoint pushes); 0 = never.
        merge: "exact" / "proportional"; default: `merge_kind(spec.strategy)`.
    """

    def __init__(self, addresses: list[str], spec: SessionSpec, *,
                 connect: Callable[[str, float, float], Any] | None = None,
                 replica_retry_seconds: float = 2.0, retry_seconds: float = 60.0,
                 on_server_failure: str = "retry", fallback_device: str | torch.device = "cpu",
                 revive_seconds: float = 30.0, connect_timeout: float = 10.0, merge: str | None = None,
                 **remote_kwargs):
        if not addresses:
            raise InvalidArgument("ReplicatedScorer needs at least one replica address")
        if on_server_failure not in ON_SERVER_FAILURE:
            raise InvalidArgument(f"on_server_failure must be one of {', '.join(ON_SERVER_FAILURE)}, "
                                  f"got {on_server_failure!r}")
        if merge is not None and merge not in MERGES:
            raise InvalidArgument(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
        self.addresses = list(addresses)
        self.spec = spec
        self.replica_retry_seconds = float(replica_retry_seconds)
        self.retry_seconds = float(retry_seconds)
        self.on_server_failure = on_server_failure
        self.fallback_device = fallback_device
        self.revive_seconds = float(revive_seconds)
        self.merge = merge or merge_kind(spec.strategy)
        if connect is None:
            def connect(address: str, retry: float, timeout: float):
                return RemoteScorer(address, spec, retry_seconds=retry, connect_timeout=timeout,
                                    on_server_failure="retry", **remote_kwargs)
        self._connect = connect
        self.counters = ScorerCounters()
        self.counters.extra.update(replicas=len(self.addresses), replicas_live=len(self.addresses),
                                   replicas_down=0, replicas_revived=0)
        self._retired = ScorerCounters()  # counters of replica clients that were replaced
        self._replicas: list[Any | None] = [None] * len(self.addresses)
        self._next_revive = [0.0] * len(self.addresses)
        self._last_push: tuple[str, Any, int, int] | None = None
        self._irreducible: dict[str, torch.Tensor] | None = None
        self._fallback: EmbeddedScorer | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._policy_generator = torch.Generator().manual_seed(int(spec.seed))
        self._threads = ThreadPoolExecutor(max_workers=len(self.addresses), thread_name_prefix="dataselect-replica")
        opened: list[Any] = []
        try:
            for k, address in enumerate(self.addresses):
                try:
                    opened.append(connect(address, self.replica_retry_seconds, connect_timeout))
                except DataselectError as exc:
                    if _is_unavailable(exc):
                        raise type(exc)(f"replica {k + 1} of {len(self.addresses)}: {exc}") from None
                    raise
            self._replicas = opened
            self.info = self._agreed_info()
        except BaseException:
            for rep in opened:
                rep.close()
            self._threads.shutdown(wait=False)
            raise

    # -- the Scorer interface -----------------------------------------------------------
    def push_checkpoint(self, model: nn.Module, version: int, step: int) -> None:
        self._push(("model", model, int(version), int(step)))

    def push_state(self, state: dict[str, torch.Tensor], version: int, step: int) -> None:
        self._push(("state", state, int(version), int(step)))

    def push_irreducible(self, state: dict[str, torch.Tensor]) -> None:
        """Every replica gets the irreducible-loss model (each scores its own ids with it); kept for revivals."""
        self._irreducible = state
        if self._fallback is not None:
            self._fallback.push_irreducible(state)
            return
        self._to_live("push_irreducible", (state,))
        self._sync_counters()

    def select(self, ids: torch.Tensor, inputs: torch.Tensor | None, labels: torch.Tensor, budget: int,
               progress: Progress, *, return_scores: bool = False) -> ScoreReply:
        if self._fallback is not None:
            return self._fallback.select(ids, inputs, labels, budget, progress, return_scores=return_scores)
        n = int(ids.numel())
        if n == 0:
            raise InvalidArgument("empty pool: send at least one candidate")
        if not 1 <= budget <= n:
            raise InvalidArgument(f"budget must be in [1, pool size {n}], got {budget} (dataselect rejects rather than clamps)")
        t0 = time.perf_counter()
        exact = self.merge == "exact"
        want_scores = exact or return_scores
        everything = torch.arange(n)
        # Work items: (pool positions, budget share). A failed replica's item is re-split.
        todo = self._shards(ids, everything, budget)
        done: list[tuple[torch.Tensor, ScoreReply]] = []
        compute = 0.0
        while todo:
            if self._fallback is not None:  # every replica went down during this call
                rest = torch.cat([pos for _, pos, _ in todo])
                reply = self._fallback.select(ids[rest], None if inputs is None else inputs[rest], labels[rest],
                                              max(1, min(len(rest), sum(b for *_, b in todo))), progress,
                                              return_scores=want_scores)
                done.append((rest, reply))
                compute += reply.server_compute_seconds
                break
            calls = []
            for j, pos, share in todo:
                b = max(1, share) if exact else share
                if b == 0:
                    continue  # proportional: this shard's share of the budget rounded to nothing
                sub_inputs = None if inputs is None else inputs[pos]
                calls.append((j, pos, share, (ids[pos], sub_inputs, labels[pos], b, progress)))
            results = self._fan_out([(j, "select", args, {"return_scores": want_scores}) for j, _, _, args in calls])
            todo = []
            round_compute = 0.0
            for (j, pos, share, _), result in zip(calls, results):
                if isinstance(result, _ReplicaDown):
                    todo.extend(self._reroute(j, result.cause, ids[pos], pos, share))
                    continue
                done.append((pos, result))
                round_compute = max(round_compute, result.server_compute_seconds)
                self.counters.extra[f"replica{j}_samples_scored"] = (
                    self.counters.extra.get(f"replica{j}_samples_scored", 0) + int(result.samples_scored))
            compute += round_compute
        reply = self._merge(ids, labels, budget, done, return_scores)
        reply.server_compute_seconds = compute
        reply.transfer_seconds = max(0.0, time.perf_counter() - t0 - compute)
        return reply

    def report(self, ids: torch.Tensor, losses: torch.Tensor, true_class_probs: torch.Tensor | None,
               correct: torch.Tensor | None, progress: Progress) -> None:
        if self._fallback is not None:
            self._fallback.report(ids, losses, true_class_probs, correct, progress)
            return
        todo = self._shards(ids, torch.arange(int(ids.numel())), 0)
        while todo:
            if self._fallback is not None:
                rest = torch.cat([pos for _, pos, _ in todo])
                self._fallback.report(ids[rest], losses[rest], _part(true_class_probs, rest), _part(correct, rest),
                                      progress)
                return
            calls = [(j, pos) for j, pos, _ in todo]
            results = self._fan_out([(j, "report", (ids[pos], losses[pos], _part(true_class_probs, pos),
                                                     _part(correct, pos), progress), {}) for j, pos in calls])
            todo = []
            for (j, pos), result in zip(calls, results):
                if isinstance(result, _ReplicaDown):
                    todo.extend(self._reroute(j, result.cause, ids[pos], pos, 0))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for rep in self._replicas:
            if rep is not None:
                rep.close()
        if self._fallback is not None:
            self._fallback.close()
        self._threads.shutdown(wait=True)

    def __enter__(self) -> "ReplicatedScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def live(self) -> list[bool]:
        """Which configured replicas are in use now."""
        return [r is not None for r in self._replicas]

    def owner_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Index (into `addresses`) of the replica that holds each id's state now."""
        return owners(ids, len(self.addresses), self.live)

    # -- counters ---------------------------------------------------------------------
    def _sync_counters(self) -> None:
        c = self.counters
        live = [r.counters for r in self._replicas if r is not None]
        c.checkpoint_bytes = self._retired.checkpoint_bytes + sum(x.checkpoint_bytes for x in live)
        c.reconnects = self._retired.reconnects + sum(x.reconnects for x in live)
        c.extra["replicas_live"] = sum(self.live)

    # -- internals --------------------------------------------------------------------
    def _agreed_info(self) -> SessionInfo:
        infos = [r.info for r in self._replicas if r is not None]
        first = infos[0]
        for k, other in enumerate(infos[1:], 2):
            for name in ("strategy", "policy", "uses_reports", "signals", "resolved_options", "auxiliary_loss"):
                if getattr(other, name) != getattr(first, name):
                    raise InvalidArgument(
                        f"scoring replicas disagree on {name}: {self.addresses[0]} has {getattr(first, name)!r}, "
                        f"{self.addresses[k - 1]} has {getattr(other, name)!r}; run the same dataselect version "
                        "and plugins on every replica")
        return SessionInfo(session_id=",".join(i.session_id for i in infos), strategy=first.strategy,
                           resolved_options=first.resolved_options, default_mode=first.default_mode,
                           policy=first.policy, device=first.device, signals=first.signals,
                           uses_reports=first.uses_reports, auxiliary_loss=first.auxiliary_loss)

    def _shards(self, ids: torch.Tensor, positions: torch.Tensor, budget: int) -> list[tuple[int, torch.Tensor, int]]:
        """(replica, positions, budget share) per live replica owning some of `ids`."""
        own = owners(ids, len(self.addresses), self.live)
        parts = [(j, positions[own == j]) for j in range(len(self.addresses))]
        parts = [(j, pos) for j, pos in parts if pos.numel()]
        shares = apportion(budget, [int(pos.numel()) for _, pos in parts])
        return [(j, pos, b) for (j, pos), b in zip(parts, shares)]

    def _reroute(self, j: int, cause: BaseException, ids: torch.Tensor, positions: torch.Tensor,
                 budget: int) -> list[tuple[int, torch.Tensor, int]]:
        """Replica `j` failed on these ids: mark it down and hand its work to the live replicas
        (or, with none left, to the fallback: replica index -1)."""
        self._mark_down(j, cause)
        if not any(self.live):
            self._all_down(cause)  # falls back, brings a replica back, or raises
        if self._fallback is not None:
            return [(-1, positions, budget)]
        return self._shards(ids, positions, budget)

    def _fan_out(self, calls: list[tuple[int, str, tuple, dict]]) -> list[Any]:
        """Run `replica.method(*args, **kwargs)` for each call in parallel; an unreachable
        replica's result is a `_ReplicaDown`, any other error is raised."""
        def one(j: int, method: str, args: tuple, kwargs: dict):
            rep = self._replicas[j]
            if rep is None:
                return _ReplicaDown(j, DataselectError(f"replica {self.addresses[j]} is down"))
            try:
                return getattr(rep, method)(*args, **kwargs)
            except DataselectError as exc:
                if _is_unavailable(exc):
                    return _ReplicaDown(j, exc)
                raise

        if len(calls) == 1:
            return [one(*calls[0])]
        futures = [self._threads.submit(one, *call) for call in calls]
        return [f.result() for f in futures]

    def _push(self, push: tuple[str, Any, int, int]) -> None:
        if self._fallback is not None:
            self._push_one(self._fallback, push)
            self.counters.checkpoint_pushes += 1
            return
        self._last_push = push
        self._revive_due()
        kind, obj, version, step = push
        self._to_live("push_state" if kind == "state" else "push_checkpoint", (obj, version, step))
        self.counters.checkpoint_pushes += 1
        self._sync_counters()

    def _to_live(self, method: str, args: tuple) -> None:
        """Call `method(*args)` on every live replica; a replica that fails is marked down. When none is
        left, `_all_down` falls back (the fallback loads the last push and the irreducible-loss model),
        brings a replica back with them, or raises."""
        live = [j for j, r in enumerate(self._replicas) if r is not None]
        results = self._fan_out([(j, method, args, {}) for j in live])
        for j, result in zip(live, results):
            if isinstance(result, _ReplicaDown):
                self._mark_down(j, result.cause)
        if not any(self.live):
            self._all_down(next(r.cause for r in results if isinstance(r, _ReplicaDown)))

    @staticmethod
    def _push_one(scorer: Any, push: tuple[str, Any, int, int]) -> None:
        kind, obj, version, step = push
        if kind == "state":
            scorer.push_state(obj, version, step)
        else:
            scorer.push_checkpoint(obj, version, step)

    def _mark_down(self, j: int, cause: BaseException) -> None:
        with self._lock:
            rep = self._replicas[j]
            if rep is None:
                return
            self._replicas[j] = None
            self._retire(rep)
            self._next_revive[j] = time.monotonic() + self.revive_seconds
            self.counters.extra["replicas_down"] = self.counters.extra.get("replicas_down", 0) + 1
        live = sum(self.live)
        log.warning("scoring replica %s is down (%s); its share goes to the %d other live replica(s)%s",
                    self.addresses[j], cause, live,
                    f"; will try it again in {self.revive_seconds:g}s" if self.revive_seconds > 0 else "")
        self._sync_counters()

    def _retire(self, rep: Any) -> None:
        self._retired.checkpoint_bytes += rep.counters.checkpoint_bytes
        self._retired.reconnects += rep.counters.reconnects
        try:
            rep.close()
        except Exception:  # noqa: BLE001 - the server is gone; closing is best effort
            pass

    def _revive_due(self) -> None:
        if self.revive_seconds <= 0:
            return
        now = time.monotonic()
        for j, rep in enumerate(self._replicas):
            if rep is None and now >= self._next_revive[j]:
                self._try_revive(j)

    def _try_revive(self, j: int, connect_timeout: float = 0.5) -> bool:
        address = self.addresses[j]
        self._next_revive[j] = time.monotonic() + self.revive_seconds
        try:
            rep = self._connect(address, self.replica_retry_seconds, connect_timeout)
        except DataselectError:
            return False
        try:
            if self._last_push is not None:
                self._push_one(rep, self._last_push)
            if self._irreducible is not None:
                rep.push_irreducible(self._irreducible)
            info = rep.info
            if (info.strategy, info.policy, info.signals) != (self.info.strategy, self.info.policy, self.info.signals):
                raise InvalidArgument(f"replica {address} came back with a different strategy setup")
        except DataselectError as exc:
            log.warning("scoring replica %s answered but could not be restored (%s); still down", address, exc)
            self._retire(rep)
            return False
        self._replicas[j] = rep
        self.counters.extra["replicas_revived"] = self.counters.extra.get("replicas_revived", 0) + 1
        log.warning("scoring replica %s is back with a new session; its ids return to it "
                    "(their per-sample strategy state restarts)", address)
        self._sync_counters()
        return True

    def _all_down(self, cause: BaseException) -> None:
        """No replica is left: fall back, or try to bring one back for `retry_seconds`."""
        if self.on_server_failure == "fallback":
            log.warning("every scoring replica is down (%s); scoring in-process for the rest of the run", cause)
            self._fallback = EmbeddedScorer(self.spec, device=self.fallback_device)
            if self._last_push is not None:
                self._push_one(self._fallback, self._last_push)
            if self._irreducible is not None:
                self._fallback.push_irreducible(self._irreducible)
            self.info = self._fallback.info
            self.counters.extra["fallback"] = 1
            return
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while time.monotonic() < deadline:
            for j in range(len(self.addresses)):
                if self._try_revive(j, connect_timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                    return
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 5.0)
        raise ServerUnavailable(f"every scoring replica is down ({', '.join(self.addresses)}; last error: {cause}); "
                                f"gave up after {self.retry_seconds:g}s: restart them, or use --on-server-failure fallback")

    def _merge(self, ids: torch.Tensor, labels: torch.Tensor, budget: int,
               done: list[tuple[torch.Tensor, ScoreReply]], return_scores: bool) -> ScoreReply:
        n = int(ids.numel())
        scores = None
        if all(r.scores is not None for _, r in done):
            scores = torch.full((n,), float("nan"))
            for pos, r in done:
                scores[pos] = r.scores.float()
        samples = sum(int(r.samples_scored) for _, r in done)
        version = min(int(r.checkpoint_version) for _, r in done)
        diagnostics = average_diagnostics([r.diagnostics for _, r in done], keep_other=True)
        if self.merge == "exact":
            if scores is None or bool(torch.isnan(scores).any()):
                raise PluginError(f"strategy {self.spec.strategy!r}: a replica returned no scores, so the budget "
                                  "cannot be applied over the whole pool (exact merge needs score-then-policy strategies)")
            sel = apply_policy(self.info.policy, scores, labels.long(), budget, self._policy_generator)
            return ScoreReply(selected_ids=ids[sel.indices], weights=sel.weights,
                              scores=scores if return_scores else None, checkpoint_version=version,
                              server_compute_seconds=0.0, samples_scored=samples, diagnostics=diagnostics)
        selected = torch.cat([r.selected_ids.long() for _, r in done])
        weights = None
        if any(r.weights is not None for _, r in done):
            weights = torch.cat([r.weights.float() if r.weights is not None else torch.ones(r.selected_ids.numel())
                                 for _, r in done])
        return ScoreReply(selected_ids=selected, weights=weights, scores=scores if return_scores else None,
                          checkpoint_version=version, server_compute_seconds=0.0, samples_scored=samples,
                          diagnostics=diagnostics)


def open_replicated(config: Any, spec: SessionSpec, device: torch.device | str) -> ReplicatedScorer:
    """The trainer's `--server host1:port,host2:port`: a ReplicatedScorer with its remote options.

    Each replica gets a short reconnect budget (at most 2 s of `--retry-seconds`) so that a dead one
    is dropped quickly; `--retry-seconds` is how long to wait for one to come back once all are down.
    """
    remote: dict[str, Any] = {"token_file": config.token_file, "tls_ca": config.tls_ca}
    for name in ("checkpoint_dtype", "checkpoint_delta"):  # optional remote settings
        if getattr(config, name, None) is not None:
            remote[name] = getattr(config, name)
    return ReplicatedScorer(parse_servers(config.server), spec, replica_retry_seconds=min(2.0, config.retry_seconds),
                            retry_seconds=config.retry_seconds, on_server_failure=config.on_server_failure,
                            fallback_device=device, **remote)


def _part(t: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[pos]


def _is_unavailable(exc: BaseException) -> bool:
    """A replica that cannot be reached (after its own short reconnect budget) or did not answer in time."""
    return isinstance(exc, ServerUnavailable)
