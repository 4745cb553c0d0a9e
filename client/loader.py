"""`SelectionLoader`: one epoch of a strategy's choice of a data set, batch by batch.

`dataselect.Session.loader(dataset, batch_size)` returns one. Iterating it runs
one epoch of the session's training mode and yields `Batch`es, which unpack as
`(inputs, targets)` like a DataLoader's and carry `ids` and `weights`:

* `online`: the epoch's shuffled order is cut into candidate pools of
  `ceil(batch_size / fraction)` samples; each pool is scored and the chosen
  samples are trained on. Selections are accumulated until a full batch is
  ready (Selective Backprop keeps a variable number per pool, as its authors'
  code does); the remainder is trained at the epoch's end. With overlap, the
  pools that fill the next batch are asked for before this batch is
  yielded, so the scorer works while you train.
* `subset`: the whole data set is scored in one Select at the first epoch after
  warm-up and every `refresh` epochs after (once for static strategies such
  as MRMC); epochs train on shuffled mini-batches of the chosen subset, with
  its weights.
* `weighted`: every epoch, the whole set is scored and `round(N × fraction)`
  draws (with replacement for importance sampling) are trained on.

Warm-up: a strategy's `warmup_epochs` option gives full-data epochs first, in
any mode, with training losses reported (MRMC fits its loss curves to them).
In online mode a fractional warm-up (0.5) trains that share of the epoch's
steps on plain batches before pools start; the other modes round it up to
whole epochs.

Data: a data set held as tensors (`TensorDataset`, `dataselect.datasets.Split`,
or anything with `inputs`/`labels` tensors) is indexed directly, the fast
path; any other map-style data set of `(input, target)` items goes through a
`torch.utils.data.DataLoader` with `num_workers` workers, so it need not fit
in memory. Sample ids are data set indices.

A yielded batch counts as trained (samples, steps, the selection digest, and
the push every `sync_every` steps) when the loop asks for the next one, so a
loop that stops before training a batch leaves it uncounted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from dataselect.client.batch import Batch, Pending
from dataselect.errors import InvalidArgument
from dataselect.scoring import PoolChunk

if TYPE_CHECKING:
    from dataselect.client.session import Session

#: Samples per chunk when a data set that is not in memory is scored as a whole.
SCORE_CHUNK = 1024


class TensorData:
    """A data set held as tensors: samples are gathered by index (no DataLoader, no copies of the whole set)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None):
        if inputs.shape[0] != labels.shape[0]:
            raise InvalidArgument(f"inputs ({inputs.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        self.inputs, self.labels = inputs, labels.long()
        self.ids = torch.arange(labels.shape[0]) if ids is None else ids.long()
        self.augment = augment

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def example(self) -> torch.Tensor:
        return self.inputs[:2]

    def fetch(self, positions: torch.Tensor, generator: torch.Generator | None = None):
        x = self.inputs[positions]
        if self.augment is not None and generator is not None:
            x = self.augment(x, generator)
        return x, self.labels[positions], self.ids[positions]

    def batches(self, parts: list[torch.Tensor], *, inputs: bool = True, generator=None):
        """(positions, inputs or None, labels, ids) per list of positions, in order."""
        for pos in parts:
            if inputs:
                x, y, ids = self.fetch(pos, generator)
            else:
                x, y, ids = None, self.labels[pos], self.ids[pos]
            yield pos, x, y, ids

    def whole(self, *, inputs: bool):
        """The whole set as one pool (ids, inputs or None, labels), without augmentation."""
        return self.ids, (self.inputs if inputs else None), self.labels


class WithIds(torch.utils.data.Dataset):
    """Items of a data set as `(input, target, index)`: a DataLoader over it gives every batch its ids."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise InvalidArgument(f"data set items must be (input, target) pairs; item {i} is {type(item).__name__}")
        return item[0], item[1], i


def _collate(items):
    x = torch.stack([torch.as_tensor(x) for x, _, _ in items])
    y = torch.as_tensor([int(t) for _, t, _ in items], dtype=torch.long)
    pos = torch.tensor([i for _, _, i in items], dtype=torch.long)
    return pos, x, y


class LoaderData:
    """Any map-style data set of (input, target) items, loaded through a DataLoader with workers."""

    def __init__(self, dataset, *, plain=None, labels: torch.Tensor | None = None, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int | None = None):
        self.dataset, self.plain = dataset, plain if plain is not None else dataset
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._labels = labels

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        """Every sample's label: the data set's `targets` when it has them, else read once."""
        if self._labels is None:
            targets = getattr(self.plain, "targets", None)
            if targets is not None and len(targets) == len(self):
                self._labels = torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets).long()
            else:
                self._labels = torch.cat([y for _, _, y in self._load([torch.arange(len(self))], self.plain)])
        return self._labels

    def example(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset[0][0]).unsqueeze(0)

    def _load(self, parts, dataset):
        extra = {} if self.num_workers == 0 or self.prefetch_factor is None else {"prefetch_factor": self.prefetch_factor}
        loader = torch.utils.data.DataLoader(WithIds(dataset), batch_sampler=[p.tolist() for p in parts],
                                             num_workers=self.num_workers, collate_fn=_collate,
                                             pin_memory=self.pin_memory, **extra)
        return iter(loader)

    def batches(self, parts: list[torch.Tensor], *, inputs: bool = True, generator=None):
        for pos, x, y in self._load(parts, self.dataset):
            yield pos, x, y, pos

    def fetch(self, positions: torch.Tensor, generator=None):
        _, x, y, ids = next(iter(self.batches([positions])))
        return x, y, ids

    def whole_chunks(self, *, inputs: bool) -> Iterator[PoolChunk]:
        """The whole set in chunks, without augmentation (for whole-set Selects of data not in memory)."""
        n = len(self)
        if not inputs:
            labels = self.labels
            for start in range(0, n, SCORE_CHUNK):
                ids = torch.arange(start, min(n, start + SCORE_CHUNK))
                yield PoolChunk(ids=ids, labels=labels[ids], inputs=None)
            return
        parts = [torch.arange(s, min(n, s + SCORE_CHUNK)) for s in range(0, n, SCORE_CHUNK)]
        for pos, x, y in self._load(parts, self.plain):
            yield PoolChunk(ids=pos, labels=y, inputs=x)


def as_data(dataset: Any, *, num_workers: int = 0, pin_memory: bool = False, plain: Any = None,
            augment: Callable | None = None, labels: torch.Tensor | None = None) -> TensorData | LoaderData:
    """The loader's view of a data set: tensors indexed directly when it holds them, else a DataLoader."""
    if isinstance(dataset, (TensorData, LoaderData)):
        return dataset
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        return TensorData(dataset.tensors[0], dataset.tensors[1], augment=augment)
    inputs, targets = getattr(dataset, "inputs", None), getattr(dataset, "labels", None)
    if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        ids = getattr(dataset, "ids", None)
        return TensorData(inputs, targets, ids if isinstance(ids, torch.Tensor) else None, augment=augment)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise InvalidArgument(f"the loader needs a map-style data set (len() and [i] giving (input, target)); "
                              f"got {type(dataset).__name__}")
    return LoaderData(dataset, plain=plain, labels=labels, num_workers=num_workers, pin_memory=pin_memory)


class _Accumulator:
    """Chosen samples waiting for a full batch, in arrival order."""

    def __init__(self):
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.size = 0

    def add(self, positions, x, y, ids, weights) -> None:
        if positions.numel():
            self.parts.append((positions, x, y, ids, weights))
            self.size += int(positions.numel())

    def take(self, n: int):
        """(positions, inputs or None, labels, ids, weights) of the first `n` buffered samples."""
        if len(self.parts) == 1 and n == self.size:  # one pool filled the batch exactly (exact budgets): no copies
            part, self.parts, self.size = self.parts[0], [], 0
            return part
        pos = torch.cat([p[0] for p in self.parts])
        has_x = all(p[1] is not None for p in self.parts)
        x = torch.cat([p[1] for p in self.parts]) if has_x else None
        y = torch.cat([p[2] for p in self.parts])
        ids = torch.cat([p[3] for p in self.parts])
        has_w = any(p[4] is not None for p in self.parts)
        w = torch.cat([torch.ones(len(p[0])) if p[4] is None else p[4].float() for p in self.parts]) if has_w else None
        rest = (pos[n:], None if x is None else x[n:], y[n:], ids[n:], None if w is None else w[n:])
        self.parts = [rest] if rest[0].numel() else []
        self.size = int(rest[0].numel())
        return pos[:n], None if x is None else x[:n], y[:n], ids[:n], None if w is None else w[:n]


@dataclass
class _Selection:
    positions: torch.Tensor
    weights: torch.Tensor | None


class SelectionLoader:
    """Iterate it once per epoch; see the module docstring.

    Args:
        session: the `Session` that scores.
        dataset: the training set (tensors, or any map-style data set of (input, target) items).
        batch_size: samples trained on per step (per rank under torchrun).
        num_workers, pin_memory: for the DataLoader of data sets not held in memory.
        plain: the same samples without augmentation, for scoring whole sets (default `dataset`).
        augment: for tensors: `augment(batch, generator)` applied to training batches and online pools.
        labels: every sample's label, if you have them (else the data set's `targets`, else read once).
        estimate_train_time: count the time your loop spends between batches as training time
            (off when the caller times its steps itself, as `dataselect-train` does).
    """

    def __init__(self, session: Session, dataset: Any, *, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, plain: Any = None, augment: Callable | None = None,
                 labels: torch.Tensor | None = None, estimate_train_time: bool = True):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidArgument(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.session = session
        self.data = as_data(dataset, num_workers=num_workers, pin_memory=pin_memory, plain=plain, augment=augment,
                            labels=labels)
        if len(self.data) == 0:
            raise InvalidArgument("the training set is empty")
        self.batch_size = batch_size
        self.estimate_train_time = estimate_train_time
        self.shuffle = torch.Generator().manual_seed(session.seed)
        self.augment_generator = torch.Generator().manual_seed(session.seed + 1)
        #: Epochs started (1-based number of the last epoch iterated).
        self.epoch = 0
        self.selection: _Selection | None = None
        self.last_selection_size = 0
        self._batch_started: float | None = None

    # -- sizes ------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Samples per step over all ranks (`batch_size` × world size under torchrun)."""
        dist = self.session.dist
        return self.batch_size * (dist.world if dist is not None else 1)

    @property
    def pool_size(self) -> int:
        return math.ceil(self.global_batch / self.session.fraction)

    def __len__(self) -> int:
        """Steps in the next epoch (an estimate for variable-size strategies)."""
        n = len(self.data)
        kind = self._kind(self.epoch + 1) if self.session.is_open or not self.session.scoring else "full"
        if kind == "online":
            return math.ceil(n / self.pool_size)
        if kind == "full":
            return math.ceil(n / self.global_batch)
        size = self.last_selection_size or self.session.budget_for(n)
        return math.ceil(size / self.global_batch)

    def _whole_warmup_epochs(self) -> int:
        w = self.session.warmup_epochs
        return int(math.floor(w)) if self.session.mode == "online" else int(math.ceil(w))

    def _kind(self, epoch: int) -> str:
        s = self.session
        if not s.scoring or epoch - 1 < self._whole_warmup_epochs():
            return "full"
        return s.mode

    def _ids_of(self, positions: torch.Tensor) -> torch.Tensor:
        return self.data.ids[positions] if isinstance(self.data, TensorData) else positions

    # -- one epoch ---------------------------------------------------------------------------
    def begin_epoch(self) -> str:
        """Start the next epoch: open the session if need be; returns its kind (full, online, subset, weighted)."""
        s = self.session
        if s.scoring and not s.is_open:
            s.open(dataset_size=len(self.data), batch_size=self.global_batch, example=self.data.example())
        if s.needs_irreducible:
            s.fit_irreducible(self.data, batch_size=self.batch_size)
        self.epoch += 1
        kind = self.epoch_kind = self._kind(self.epoch)
        if kind == "full":
            s.costs.full_data_epochs += 1
        return kind

    def epoch_selection(self, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples a full, subset or weighted epoch trains on (selecting the whole set when due)."""
        if kind == "full":
            return torch.arange(len(self.data)), None
        since_warmup = self.epoch - 1 - self._whole_warmup_epochs()
        due = kind == "weighted" or self.selection is None or (
            not self.session.static and since_warmup % self.session.refresh == 0)
        if due:
            self._select_whole_set()
        return self.selection.positions, self.selection.weights

    def __iter__(self) -> Iterator[Batch]:
        kind = self.begin_epoch()
        if kind == "online":
            return self._online_epoch()
        return self._minibatches(*self.epoch_selection(kind))

    def _emit(self, positions, x, y, ids, weights, within: float) -> Iterator[Batch]:
        """Yield one step's batch (this rank's share under torchrun); count it once the loop comes back."""
        s = self.session
        dist = s.dist
        if dist is not None:
            mine = dist.share(positions, weights, self._ids_of, s.progress(self.epoch, within))
            if mine is None:  # fewer samples than ranks: no rank steps
                return
            keep = slice(dist.rank, None, dist.world)
            positions, weights = mine
            x, y, ids = (None if x is None else x[keep]), y[keep], ids[keep]
        if x is None:
            t0 = time.perf_counter()
            x, y, ids = self.data.fetch(positions, self.augment_generator)
            s.costs.data_seconds += time.perf_counter() - t0
        batch = Batch(x, y, ids, weights, s.progress(self.epoch, within))
        s.current = batch
        self._batch_started = time.perf_counter()
        yield batch
        if self.estimate_train_time and self._batch_started is not None:
            s.costs.train_seconds += time.perf_counter() - self._batch_started
        self._batch_started = None
        s.current = None
        s.finish_batch(batch)

    def minibatch_parts(self, positions: torch.Tensor, weights: torch.Tensor | None):
        """Shuffle `positions` (weights follow) and cut them into batches of the global batch size."""
        bs = self.global_batch
        order = torch.randperm(len(positions), generator=self.shuffle)
        positions = positions[order]
        weights = None if weights is None else weights[order]
        n_steps = math.ceil(len(positions) / bs)
        parts = [positions[i * bs:(i + 1) * bs] for i in range(n_steps)]
        return parts, (None if weights is None else [weights[i * bs:(i + 1) * bs] for i in range(n_steps)])

    def _minibatches(self, positions: torch.Tensor, weights: torch.Tensor | None) -> Iterator[Batch]:
        """Shuffle `positions` (weights follow) and yield them in batches of the global batch size."""
        parts, weight_parts = self.minibatch_parts(positions, weights)
        t0 = time.perf_counter()
        for i, (pos, x, y, ids) in enumerate(self.data.batches(parts, generator=self.augment_generator)):
            self.session.costs.data_seconds += time.perf_counter() - t0
            yield from self._emit(pos, x, y, ids, None if weight_parts is None else weight_parts[i], i / len(parts))
            t0 = time.perf_counter()

    def pool_parts(self, order: torch.Tensor) -> list[torch.Tensor]:
        """An online epoch's candidate pools: `order` cut into pieces of `pool_size`, each one step's
        batch. During the session's ramp (overlap) pool k is planned for step `steps + k` and holds
        ceil(batch / fraction at that step) candidates, so the pools grow from one batch to `pool_size`
        while the budget stays one batch (`pool_fractions` holds each pool's fraction)."""
        s = self.session
        s.start_ramp()
        parts: list[torch.Tensor] = []
        self.pool_fractions: list[float] = []
        start, step = 0, s.steps
        while start < len(order):
            f = s.fraction_at(step)
            size = math.ceil(self.global_batch / f - 1e-9)
            parts.append(order[start:start + size])
            self.pool_fractions.append(f)
            start, step = start + size, step + 1
        return parts

    def _online_epoch(self) -> Iterator[Batch]:
        s = self.session
        bs, pool_size = self.global_batch, self.pool_size
        order = torch.randperm(len(self.data), generator=self.shuffle)
        warm = self.session.warmup_epochs - self._whole_warmup_epochs()
        if warm > 0 and self.epoch - 1 == self._whole_warmup_epochs():
            # A fractional warm-up: this share of the epoch trains on plain batches before pools start.
            n, head = len(order), min(len(order), round(warm * len(order)))
            parts = [order[i:min(head, i + bs)] for i in range(0, head, bs)]
            for i, (pos, x, y, ids) in enumerate(self.data.batches(parts, generator=self.augment_generator)):
                yield from self._emit(pos, x, y, ids, None, i * bs / n)
            order = order[head:]
        pools = self.pool_parts(order)
        fractions = self.pool_fractions
        n_pools = len(pools)
        source = self.data.batches(pools, inputs=s.needs_inputs, generator=self.augment_generator)
        buffer = _Accumulator()
        overlap = s.pipeline is not None
        pending: list[tuple[Any, Pending]] = []
        asked = 0

        def request(i: int):
            t0 = time.perf_counter()
            pos, x, y, ids = next(source)
            s.costs.data_seconds += time.perf_counter() - t0
            budget = s.budget_for(len(pos), fractions[i])
            return (pos, x, y, ids), s.request(ids, x, y, budget, s.progress(self.epoch, i / n_pools),
                                               keep=fractions[i])

        try:
            for i in range(n_pools):
                depth = 1 + s.pools_per_batch() if overlap else 1
                while asked < n_pools and len(pending) < depth:
                    pending.append(request(asked))
                    asked += 1
                (pos, x, y, ids), ask = pending.pop(0)
                chosen = s.wait(ask)
                rows = chosen.rows
                buffer.add(pos[rows], None if x is None else x[rows], y[rows], ids[rows], chosen.weights)
                while buffer.size >= bs:
                    yield from self._emit(*buffer.take(bs), (i + 1) / n_pools)
                    s.push_if_due()
            if buffer.size:
                yield from self._emit(*buffer.take(buffer.size), 1.0)
                s.push_if_due()
        finally:
            s.cancel(p for _, p in pending)  # a stopped epoch: the selections asked for ahead are not needed

    def _select_whole_set(self) -> None:
        """Score the whole training set in one Select (budget = round(N × fraction)) and keep the result."""
        s = self.session
        n = len(self.data)
        progress = s.progress(self.epoch, 0.0)
        budget = s.budget_for(n)
        t0 = time.perf_counter()
        if isinstance(self.data, TensorData):
            ids, x, y = self.data.whole(inputs=s.needs_inputs)
            s.costs.data_seconds += time.perf_counter() - t0
            chosen = s.wait(s.request(ids, x, y, budget, progress, fresh_model=True))
            positions = chosen.rows
        else:
            chosen = s.select_chunks(self.data.whole_chunks(inputs=s.needs_inputs), budget, progress)
            positions = chosen.ids
        s.costs.refreshes += 1
        self.selection = _Selection(positions, chosen.weights)
        self.last_selection_size = int(positions.numel())


    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resuming after a finished epoch needs: the epoch, the shuffle and the current subset."""
        sel = self.selection
        return {"epoch": self.epoch, "shuffle_state": self.shuffle.get_state(),
                "augment_state": self.augment_generator.get_state(),
                "selection": None if sel is None else {"positions": sel.positions, "weights": sel.weights},
                "last_selection_size": self.last_selection_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.shuffle.set_state(state["shuffle_state"])
        if state.get("augment_state") is not None:
            self.augment_generator.set_state(state["augment_state"])
        sel = state.get("selection")
        self.selection = None if sel is None else _Selection(sel["positions"].long(), sel["weights"])
        self.last_selection_size = int(state.get("last_selection_size", 0))


class SelectionSampler(torch.utils.data.Sampler):
    """Index batches for one epoch of the session's mode, for a DataLoader of your own (or a framework's):

        sampler = session.batch_sampler(train_set, batch_size=64)
        loader = DataLoader(dataselect.WithIds(train_set), batch_sampler=sampler, num_workers=4)
        for x, y, ids in loader:
            x, y = session.take(x, y, ids)   # online: the chosen rows of the candidate pool
            loss = session.loss(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            session.step()

    In online mode each index batch is a candidate pool and `Session.take` selects from it
    with the current model (a variable-size strategy then trains a variable-size batch);
    in subset and weighted modes the selection happens when the epoch begins and `take`
    attaches the weights. Under torchrun use `Session.loader`, which shares pools over ranks.
    """

    def __init__(self, session: Session, dataset: Any, *, batch_size: int = 64, **loader_kwargs):
        self.loader = SelectionLoader(session, dataset, batch_size=batch_size, estimate_train_time=False,
                                      **loader_kwargs)
        #: Where the epoch is: (kind, index of the batch, batches in the epoch, weights of the batch).
        self.position: tuple[str, int, int, torch.Tensor | None] = ("full", 0, 1, None)
        session.sampler = self

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        loader = self.loader
        if loader.session.dist is not None:
            raise InvalidArgument("under torchrun use Session.loader (it shares each pool over the ranks), "
                                  "not a batch sampler")
        kind = loader.begin_epoch()
        if kind == "online":
            order = torch.randperm(len(loader.data), generator=loader.shuffle)
            warm = loader.session.warmup_epochs - loader._whole_warmup_epochs()
            if warm > 0 and loader.epoch - 1 == loader._whole_warmup_epochs():
                head = min(len(order), round(warm * len(order)))
                parts = [order[i:min(head, i + loader.global_batch)] for i in range(0, head, loader.global_batch)]
                for i, part in enumerate(parts):
                    self.position = ("full", i * loader.global_batch, len(order), None)
                    yield part.tolist()
                order = order[head:]
            pools = loader.pool_parts(order)
            for i, pool in enumerate(pools):
                self.position = ("online", i, len(pools), None)
                yield pool.tolist()
            return
        parts, weight_parts = loader.minibatch_parts(*loader.epoch_selection(kind))
        for i, part in enumerate(parts):
            self.position = (kind, i, len(parts), None if weight_parts is None else weight_parts[i])
            yield part.tolist()
