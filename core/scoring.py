"""The scoring session: one strategy instance plus one model copy.

The gRPC server keeps one `ScoringSession` per remote session; the trainer's
embedded mode keeps one in-process. Both transports run this same code, so a
strategy behaves identically with or without a server.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dataselect.checkpoint import load_state, validate
from dataselect.engine import (
    DEFAULT_MICRO_BATCH,
    compute_signals,
    free_device_memory,
    parse_micro_batch,
    pick_micro_batch,
    prepare_inputs,
    resolve_channels_last,
    resolve_precision,
    signal_bytes_per_sample,
    synchronize,
)
from dataselect.errors import (
    Cancelled,
    DataselectError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PluginError,
    ResourceExhausted,
)
from dataselect.models import ScoringModel, build_model, input_dtype
from dataselect.names import SESSION_SIGNALS
from dataselect.policies import POLICIES, VARIABLE_SIZE_POLICIES, apply_policy
from dataselect.proxy import SessionProxy
from dataselect.registry import get_model_builder, get_strategy, strategies
from dataselect.strategy import Pool, Progress, Report, Selection, SessionContext

log = logging.getLogger("dataselect.scoring")

#: Input dtypes a pool may carry: images as stored (uint8) or already scaled floats.
INPUT_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device (or host) allocation failure, whatever the backend calls it."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(oom, type) and isinstance(exc, oom):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


@dataclass
class PoolChunk:
    """Part of a candidate pool as it arrives (one message, or one piece of a stream)."""

    ids: torch.Tensor
    labels: torch.Tensor
    inputs: torch.Tensor | None


@dataclass
class SelectResult:
    selected_ids: torch.Tensor
    weights: torch.Tensor | None
    scores: torch.Tensor | None
    checkpoint_version: int
    compute_seconds: float
    samples_scored: int
    #: Figures about this selection for the trainer's metrics (the proxy's agreement, the strategy's own).
    diagnostics: dict[str, Any] = field(default_factory=dict)


class ScoringSession:
    """Scores pools with a strategy and a copy of the trainer's model."""

    def __init__(
        self,
        strategy: str,
        options: dict[str, Any] | None,
        model: str | nn.Module,
        model_kwargs: dict[str, Any] | None = None,
        *,
        num_classes: int,
        seed: int = 0,
        dataset: str = "",
        dataset_size: int = 0,
        policy: str = "",
        device: torch.device | str = "cpu",
        micro_batch: int | str = "auto",
        precision: str = "auto",
        channels_last: bool | str | None = "auto",
        compile: bool = False,
        input_scale: float = 1.0,
        last_layer: str | None = None,
        input_shape: tuple[int, ...] | None = None,
        model_label: str | None = None,
    ):
        """`model` is a registered architecture's name (built with `model_kwargs`) or an
        `nn.Module` that the session takes as its scoring copy (the caller copies it; an
        embedded session scores on a copy of the user's model). `last_layer` names the
        final `nn.Linear` for last-layer signals (found by itself when None);
        `input_shape` is one sample's shape when known (checked on every pool;
        registered image models know theirs).

        Engine options (see `dataselect.engine`): `micro_batch` 'auto' (sized from free
        CUDA memory; `DEFAULT_MICRO_BATCH` elsewhere) or a number; `precision`
        auto|fp32|bf16|fp16 for forward signals; `channels_last` auto|on|off;
        `compile` the model's forward with `torch.compile` (eager, with a warning,
        if that fails); `input_scale` in (0, 1] scores on inputs downscaled by
        that factor (refused at open for models that cannot take them).
        """
        cls = get_strategy(strategy)
        if num_classes < 2:
            raise InvalidArgument(f"num_classes must be >= 2, got {num_classes}")
        if dataset_size < 0:
            raise InvalidArgument(f"dataset_size must be >= 0 (0 = unknown), got {dataset_size}")
        if not 0 <= int(seed) < 2**64:
            raise InvalidArgument(f"seed must lie in [0, 2**64), got {seed}")
        self.strategy = strategy
        # Name the registering plugin too, so a failing third-party strategy is easy to trace.
        self.plugin_label = f"strategy {strategy!r} (plugin {strategies()[strategy].plugin!r})"
        self.context = SessionContext(
            num_classes=num_classes, dataset=dataset, dataset_size=dataset_size, seed=seed,
            generator=torch.Generator().manual_seed(int(seed)),
        )
        try:
            self.strategy_object = cls(options or {}, self.context)
        except DataselectError:
            raise
        except Exception as exc:
            raise PluginError(f"{self.plugin_label} failed to start: {type(exc).__name__}: {exc}") from exc
        if policy and policy not in POLICIES:
            raise InvalidArgument(f"unknown policy {policy!r}; use one of: {', '.join(POLICIES)}")
        self.policy = policy or cls.default_policy
        self.device = torch.device(device)
        micro_batch = parse_micro_batch(micro_batch)
        #: 'auto' sizes each pool's micro-batch from free device memory; self.micro_batch then
        #: only caps it (None until an out-of-memory retry sets a cap).
        self.auto_micro_batch = micro_batch == "auto"
        self.micro_batch: int | None = None if self.auto_micro_batch else micro_batch
        self._bytes_per_sample: dict[tuple, int] = {}
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.channels_last = resolve_channels_last(channels_last, self.device)
        try:
            self.input_scale = float(input_scale)
        except (TypeError, ValueError):
            raise InvalidArgument(f"input_scale must be a number in (0, 1], got {input_scale!r}") from None
        if not 0.0 < self.input_scale <= 1.0:  # also refuses NaN
            raise InvalidArgument(f"input_scale must be in (0, 1] (1 = full size, 0.5 = half the height and width), "
                                  f"got {input_scale!r}")
        self.registered = isinstance(model, str)
        self.model_name = model if self.registered else (model_label or type(model).__name__)
        self.model_kwargs = dict(model_kwargs or {})
        self.model = self._build_model(model)
        self.scoring_model = ScoringModel(self.model, last_layer=last_layer)
        self.input_shape = self._input_shape() if input_shape is None else tuple(int(d) for d in input_shape)
        self._check_model()
        self._check_input_scale()
        if compile:
            self._compile()
        self.proxy: SessionProxy | None = None
        if getattr(self.strategy_object, "proxy_width_ratio", None) is not None:
            if not self.registered:
                raise InvalidArgument(f"strategy {strategy!r} scores with a parameter-sharing proxy, which needs a "
                                      "registered model with a slim sub-network (cnn-small, cnn-deep, mlp); this "
                                      "session's model is not one: use proxy=none")
            # DynaMS PSP: the signals come from the model's slim sub-network (dataselect.proxy).
            self.proxy = SessionProxy(
                self.model_name, self.model_kwargs, self.strategy_object.proxy_width_ratio, self.model, self.device,
                loss_weight=self.strategy_object.proxy_loss_weight, agreement_sample=self.strategy_object.proxy_agreement_sample,
                input_shape=self.input_shape, who=f"strategy {strategy!r} (parameter-sharing proxy)")
            if self.channels_last:  # the same memory format as the model it stands in for
                self.proxy.model = self.proxy.model.to(memory_format=torch.channels_last)
        self.signals = frozenset(self.strategy_object.signals)
        #: The signals the engine computes; the rest (SESSION_SIGNALS) come from this session.
        self.engine_signals = self.signals - SESSION_SIGNALS
        #: RHO-LOSS's irreducible-loss model (pushed by the trainer, see `load_irreducible`) and its
        #: losses, computed once per sample id.
        self.irreducible: ScoringModel | None = None
        self.irreducible_losses: dict[int, float] = {}
        self.checkpoint_version: int | None = None
        self.lock = threading.Lock()
        self.closed = False
        self.last_used = time.monotonic()

    def _build_model(self, model: str | nn.Module) -> nn.Module:
        if self.registered:
            try:
                model = build_model(self.model_name, **self.model_kwargs)
            except DataselectError:
                raise
            except Exception as exc:  # e.g. in_channels=0: the builder's own error says what is wrong
                raise InvalidArgument(f"model {self.model_name!r} cannot be built with {self.model_kwargs}: "
                                      f"{type(exc).__name__}: {exc}") from None
        elif not isinstance(model, nn.Module):
            raise InvalidArgument(f"model must be a registered model's name or an nn.Module, got {type(model).__name__}")
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.eval()

    def _check_model(self) -> None:
        """With a known input shape, one trial forward at open: logits of the right width, and finite
        (a model argument such as std=[0] makes every score NaN; say so now, not at the first Select)."""
        x = self._trial_input()
        if x is None:
            return
        try:
            with torch.inference_mode():
                z = self.model(x)
        except Exception as exc:
            raise InvalidArgument(f"model {self.model_name!r} fails on a {list(x.shape[1:])} input: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if z.dim() != 2 or z.shape[1] != self.context.num_classes:
            raise InvalidArgument(f"num_classes {self.context.num_classes} disagrees with model {self.model_name!r}, "
                                  f"which returns {list(z.shape)} for {x.shape[0]} samples; pass the same num_classes to both")
        if not bool(torch.isfinite(z).all()):
            raise InvalidArgument(f"model {self.model_name!r} built with {self.model_kwargs} gives non-finite logits on a "
                                  "blank input: check its arguments (e.g. every std must be > 0)")

    # -- engine options ------------------------------------------------------------
    def scaled_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The (height, width) inputs are scored at; None = as they come."""
        if self.input_scale == 1.0:
            return None
        return (max(1, round(height * self.input_scale)), max(1, round(width * self.input_scale)))

    def _trial_input(self) -> torch.Tensor | None:
        if self.input_shape is None or None in self.input_shape:
            return None  # a model that does not say what it takes: checked at the first Select
        return torch.zeros(2, *self.input_shape, dtype=input_dtype(self.scoring_model), device=self.device)

    def _trial_forward(self, x: torch.Tensor) -> None:
        x = prepare_inputs(x, channels_last=self.channels_last, input_size=self.scaled_size(*x.shape[-2:]))
        with torch.inference_mode():
            self.scoring_model.logits(x)

    def _check_input_scale(self) -> None:
        """A model with a fixed flatten size cannot take downscaled inputs: say so at open, not at the first Select."""
        if self.input_scale == 1.0:
            return
        if self.input_shape is not None and len(self.input_shape) != 3:
            raise InvalidArgument(f"input_scale {self.input_scale:g} downscales images [C, H, W]; this model takes "
                                  f"{list(self.input_shape)}: use input_scale 1.0")
        x = self._trial_input()
        if x is None:
            return
        size = self.scaled_size(*x.shape[-2:])
        try:
            self._trial_forward(x)
        except Exception as exc:
            raise InvalidArgument(
                f"model {self.model_name!r} cannot score inputs downscaled to {size[0]}x{size[1]} "
                f"(input_scale {self.input_scale:g} of {x.shape[-2]}x{x.shape[-1]}): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}; use input_scale 1.0, or a model with adaptive "
                "pooling such as cnn-deep or resnet18") from None

    def _compile(self) -> None:
        """torch.compile the model's forward for forward signals; on failure warn and stay eager."""
        sm = self.scoring_model
        try:
            sm.compiled = torch.compile(self.model.features if sm.protocol else self.model)
            x = self._trial_input()
            if x is not None:
                self._trial_forward(x)  # compiles now, so a failure shows at open
        except Exception as exc:
            sm.compiled = None
            log.warning("torch.compile failed for model %r (%s: %s); scoring without compile",
                        self.model_name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    def _micro_batch_for(self, inputs: torch.Tensor, model) -> int:
        """The micro-batch for this pool: fixed, or 'auto' from free device memory (capped after an OOM)."""
        if not self.auto_micro_batch:
            return self.micro_batch
        free = free_device_memory(self.device)
        if free is None or inputs.shape[0] == 0:
            size = DEFAULT_MICRO_BATCH
        else:
            key = (id(model), tuple(inputs.shape[1:]), inputs.dtype)
            if key not in self._bytes_per_sample:  # one trial forward per model and input shape
                self._bytes_per_sample[key] = signal_bytes_per_sample(
                    model, inputs, self.engine_signals or frozenset({"loss"}), autocast_dtype=self.autocast_dtype, channels_last=self.channels_last,
                    input_size=self.scaled_size(*inputs.shape[-2:]))
            size = pick_micro_batch(free, self._bytes_per_sample[key])
        return size if self.micro_batch is None else min(size, self.micro_batch)

    def _input_shape(self) -> tuple | None:
        """(channels, height, width) a registered model takes, from its kwargs or its builder's defaults
        (None: unknown, e.g. a module the caller built)."""
        if not self.registered:  # an exported program knows its input; another module does not say
            shape = getattr(self.model, "input_shape", None) if self.scoring_model.exported else None
            return None if shape is None else tuple(int(d) for d in shape)
        try:
            params = inspect.signature(get_model_builder(self.model_name)).parameters
        except (TypeError, ValueError):
            params = {}

        def arg(name):
            if name in self.model_kwargs:
                return self.model_kwargs[name]
            p = params.get(name)
            return None if p is None or p.default is inspect.Parameter.empty else p.default

        c, size = arg("in_channels"), arg("image_size")
        return None if c is None or size is None else (c, size, size)

    # -- model updates -----------------------------------------------------------
    def load_checkpoint(self, ckpt: Any, version: int) -> None:
        """Load a checkpoint dict (already read with weights_only=True)."""
        ckpt = validate(ckpt)
        name = ckpt.get("model")
        if name is not None and name != self.model_name:
            raise InvalidArgument(f"checkpoint is for model {name!r} but this session was opened for {self.model_name!r}")
        role = ckpt.get("role", "model")
        if role == "irreducible":
            self.load_irreducible(ckpt["state_dict"])
            return
        if role != "model":
            raise InvalidArgument(f"checkpoint role {role!r} is not one of: model, irreducible")
        delta_of = ckpt.get("delta_of")
        if delta_of is not None and (not isinstance(delta_of, int) or isinstance(delta_of, bool)):
            raise InvalidArgument(f"checkpoint 'delta_of' must be an integer version, got {type(delta_of).__name__}")
        self.load_state_dict(ckpt["state_dict"], version, delta_of=delta_of)

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int, *, delta_of: int | None = None) -> None:
        """Load weights as checkpoint `version`. With `delta_of`, `state` holds only the tensors
        that changed since version `delta_of`, which must be the one loaded."""
        with self.lock:
            self._check_open()
            if delta_of is not None:
                if self.checkpoint_version != delta_of:
                    held = "no checkpoint" if self.checkpoint_version is None else f"version {self.checkpoint_version}"
                    raise FailedPrecondition(f"checkpoint is a delta against version {delta_of} but this session "
                                             f"holds {held}; push a full checkpoint")
                merged = dict(self.model.state_dict())
                unknown = sorted(set(state) - set(merged))
                if unknown:
                    raise InvalidArgument(f"checkpoint delta for {self.model_name} has unexpected keys {unknown[:5]}")
                state = {**merged, **state}
            load_state(self.model, state, model_name=self.model_name)
            self.model.eval()
            self.checkpoint_version = int(version)

    def load_irreducible(self, state: dict[str, torch.Tensor]) -> None:
        """Load the irreducible-loss model (RHO-LOSS): the session's architecture with weights trained on a
        holdout. Its losses are computed once per sample id and cached; a new model clears the cache."""
        if "irreducible_loss" not in self.signals:
            raise FailedPrecondition(f"strategy {self.strategy!r} does not use an irreducible-loss model; "
                                     "push one only to a strategy that asks for the signal irreducible_loss")
        with self.lock:
            self._check_open()
            if self.registered:
                model = build_model(self.model_name, **self.model_kwargs).to(self.device)
            else:
                model = copy.deepcopy(self.model)
            load_state(model, state, model_name=f"{self.model_name} (irreducible-loss model)")
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.irreducible = ScoringModel(model.eval())  # only its loss is read
            self.irreducible_losses = {}

    def _irreducible_for(self, chunk: PoolChunk, cancelled: Callable[[], bool] | None) -> torch.Tensor:
        """Each sample's loss under the irreducible-loss model, from the cache or computed now (and cached)."""
        cache = self.irreducible_losses
        ids = chunk.ids.tolist()
        missing = [j for j, i in enumerate(ids) if i not in cache]
        if missing:
            rows = torch.tensor(missing, dtype=torch.long)
            inputs = chunk.inputs[rows]
            if inputs.is_floating_point() and inputs.dtype != torch.float32:
                inputs = inputs.float()
            got = self._compute_signals(inputs, chunk.labels[rows], model=self.irreducible, cancelled=cancelled,
                                        signals=frozenset({"loss"}))["loss"]
            for j, value in zip(missing, got.tolist()):
                cache[ids[j]] = value
        return torch.tensor([cache[i] for i in ids], dtype=torch.float32)

    # -- selection -----------------------------------------------------------------
    def check_chunk(self, chunk: PoolChunk) -> None:
        ids, labels, inputs = chunk.ids, chunk.labels, chunk.inputs
        if ids.dim() != 1 or ids.dtype != torch.int64:
            raise InvalidArgument(f"ids must be a 1-D int64 tensor, got {ids.dtype} of shape {list(ids.shape)}")
        if labels.dim() != 1 or labels.dtype not in LABEL_DTYPES:
            raise InvalidArgument(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {list(labels.shape)}")
        if labels.shape[0] != ids.shape[0]:
            raise InvalidArgument(f"ids ({ids.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.context.num_classes):
            raise InvalidArgument(f"labels must lie in [0, {self.context.num_classes}); got values from {int(labels.min())} to {int(labels.max())}")
        if inputs is None:
            if self.signals:
                raise InvalidArgument(f"strategy {self.strategy!r} needs inputs, but the pool has none")
            return
        if inputs.dim() == 0 or inputs.shape[0] != ids.shape[0]:
            raise InvalidArgument(f"ids ({ids.shape[0]}) and inputs ({list(inputs.shape)[:1]}) differ in length")
        if inputs.dtype not in INPUT_DTYPES and (self.registered or inputs.dtype not in LABEL_DTYPES):
            kinds = "uint8 images or floats in [0, 1]" if self.registered else "numbers"
            raise InvalidArgument(f"inputs must be {kinds}, got {inputs.dtype}")
        expected = self.input_shape
        if expected is not None and tuple(inputs.shape[1:]) != tuple(expected):
            raise InvalidArgument(f"inputs must have shape [N, {', '.join(map(str, expected))}] for this model, "
                                  f"got {list(inputs.shape)}")
        if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            raise InvalidArgument("inputs contain NaN or Inf; clean the data (dataselect rejects non-finite inputs rather than scoring them)")

    def select(
        self,
        chunks: Iterable[PoolChunk],
        budget: int,
        *,
        progress: Progress | None = None,
        policy: str = "",
        return_scores: bool = False,
        cancelled: Callable[[], bool] | None = None,
    ) -> SelectResult:
        """Score a pool given as one or more chunks and select `budget` of it.

        `cancelled` is asked between chunks and micro-batches; once it returns True the
        call stops with `Cancelled` instead of finishing work nobody will read.
        """
        self.last_used = time.monotonic()
        progress = progress or Progress()
        policy = policy or self.policy
        if policy not in POLICIES:
            raise InvalidArgument(f"unknown policy {policy!r}; use one of: {', '.join(POLICIES)}")
        if self.signals and self.checkpoint_version is None:
            raise FailedPrecondition("no checkpoint loaded yet: upload one (UploadCheckpoint) before Select")
        if "irreducible_loss" in self.signals and self.irreducible is None:
            raise FailedPrecondition(
                f"strategy {self.strategy!r} needs an irreducible-loss model and none was pushed: push one (a "
                "checkpoint with role 'irreducible'); dataselect.Session trains and pushes it when its loader "
                "starts, or call session.fit_irreducible(train_set) before selecting by hand")
        with self.lock:
            self._check_open()
            t0 = time.perf_counter()
            ids_parts, label_parts = [], []
            signal_parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.signals}
            chunks = self._checked(chunks)
            proxy = self.proxy if self.signals else None
            if proxy is not None:  # the slim sub-network scores; the full model only measures agreement
                proxy.sync(self.model, self.checkpoint_version)
                chunks = proxy.calibrating(chunks, prepare=lambda x: prepare_inputs(
                    x, channels_last=self.channels_last, input_size=self.scaled_size(*x.shape[-2:])))
                agreement = proxy.agreement(self._compute_signals)
            for chunk in chunks:
                if cancelled is not None and cancelled():
                    raise Cancelled("Select stopped: the caller cancelled or its deadline passed")
                ids_parts.append(chunk.ids)
                label_parts.append(chunk.labels.long())
                if self.engine_signals:
                    got = self._compute_signals(chunk.inputs, chunk.labels, model=None if proxy is None else proxy.model,
                                                cancelled=cancelled)
                    if proxy is not None:
                        agreement.observe(chunk.inputs, chunk.labels, got)
                    for k, v in got.items():
                        signal_parts[k].append(v)
                if "irreducible_loss" in self.signals:
                    signal_parts["irreducible_loss"].append(self._irreducible_for(chunk, cancelled))
            ids = torch.cat(ids_parts) if ids_parts else torch.empty(0, dtype=torch.long)
            labels = torch.cat(label_parts) if label_parts else torch.empty(0, dtype=torch.long)
            n = int(ids.numel())
            if n == 0:
                raise InvalidArgument("empty pool: send at least one candidate")
            if budget <= 0 or budget > n:
                raise InvalidArgument(f"budget must be in [1, pool size {n}], got {budget} (dataselect rejects rather than clamps)")
            if torch.unique(ids).numel() != n:
                raise InvalidArgument("duplicate ids in the pool: each candidate must appear once")
            pool = Pool(ids=ids, labels=labels,
                        signals={k: torch.cat(v) for k, v in signal_parts.items()}, progress=progress,
                        checkpoint_version=-1 if self.checkpoint_version is None else int(self.checkpoint_version))
            self._check_signals(pool)
            sel = self._run_strategy(pool, budget, policy)
            diagnostics = dict(sel.diagnostics or {})
            if proxy is not None:
                diagnostics.update(agreement.result())
            synchronize(self.device)
            elapsed = time.perf_counter() - t0
        return SelectResult(
            selected_ids=ids[sel.indices],
            weights=sel.weights,
            scores=sel.scores if return_scores else None,
            checkpoint_version=-1 if self.checkpoint_version is None else self.checkpoint_version,
            compute_seconds=elapsed,
            samples_scored=n,
            diagnostics=diagnostics,
        )

    def _check_signals(self, pool: Pool) -> None:
        """Non-finite signals come from the model, not the strategy: say so, naming samples, before the
        strategy sees them (it would otherwise be blamed for NaN scores)."""
        for name, value in pool.signals.items():
            if not value.is_floating_point():
                continue
            bad = ~torch.isfinite(value.reshape(len(pool), -1)).all(dim=1)
            if bool(bad.any()):
                ids = pool.ids[bad][:5].tolist()
                raise FailedPrecondition(
                    f"the scoring model gives non-finite {name} for {int(bad.sum())} of {len(pool)} samples (ids "
                    f"{', '.join(map(str, ids))}{', ...' if int(bad.sum()) > 5 else ''}) with checkpoint version "
                    f"{self.checkpoint_version}: the trained weights have diverged or overflow on these inputs; "
                    "lower the learning rate or push weights from before training diverged")

    def _checked(self, chunks: Iterable[PoolChunk]) -> Iterable[PoolChunk]:
        for chunk in chunks:
            self.check_chunk(chunk)
            yield chunk

    def _compute_signals(self, inputs: torch.Tensor, labels: torch.Tensor, *, model=None,
                         cancelled: Callable[[], bool] | None = None,
                         signals: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        """The engine's signals (default: the strategy's) from `model` (default: the session's); out of memory
        halves the micro-batch and retries, down to 1."""
        if inputs.is_floating_point() and inputs.dtype != torch.float32:
            inputs = inputs.float()  # the models compute in float32
        model = self.scoring_model if model is None else model
        micro_batch = self._micro_batch_for(inputs, model)
        while True:
            compiled = getattr(model, "compiled", None)
            try:
                return compute_signals(model, inputs, labels, signals or self.engine_signals, device=self.device,
                                       micro_batch=micro_batch,
                                       autocast_dtype=self.autocast_dtype, channels_last=self.channels_last,
                                       input_size=self.scaled_size(*inputs.shape[-2:]) if inputs.dim() == 4 else None,
                                       cancelled=cancelled)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    if compiled is None or isinstance(exc, DataselectError):
                        raise
                    # A compiled forward can fail on shapes it had not seen; eager still works.
                    log.warning("compiled scoring model failed (%s: %s); scoring without compile from now on",
                                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    model.compiled = None
                    continue
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if micro_batch <= 1:
                    raise ResourceExhausted(
                        f"out of memory on {self.device} while scoring even one sample at a time ({exc}); "
                        "use a smaller model, free the device or run the server on a larger one") from None
                # Kept for later calls: the memory that ran out is usually still taken.
                micro_batch = self.micro_batch = max(1, micro_batch // 2)
                log.warning("out of memory on %s while scoring; retrying with micro-batch %d",
                            self.device, micro_batch)

    def _run_strategy(self, pool: Pool, budget: int, policy: str) -> Selection:
        """Run the strategy; whatever it gets wrong becomes a PluginError naming it and its plugin."""
        try:
            try:
                if self.strategy_object.select_kind == "score_then_policy":
                    # The default select: check score()'s output before a policy indexes with it.
                    scores = self.strategy_object.score(pool)
                    self._check_scores(scores, len(pool))
                    sel = apply_policy(policy, scores, pool.labels, budget, self.strategy_object.context.generator)
                else:
                    sel = self.strategy_object.select(pool, budget, policy)
            except DataselectError:
                raise
            except Exception as exc:
                raise PluginError(f"{self.plugin_label} raised {type(exc).__name__}: {exc}") from exc
            return self._check_selection(sel, len(pool), budget, policy)
        except PluginError as exc:
            reg = strategies().get(self.strategy)
            if reg is None or reg.plugin in str(exc):
                raise
            origin = " ".join(p for p in (reg.distribution, reg.version) if p)
            raise PluginError(f"{exc} [strategy from plugin {reg.plugin!r}, {origin}]") from exc.__cause__

    def _check_scores(self, scores: Any, n: int) -> None:
        label = self.plugin_label
        if not isinstance(scores, torch.Tensor):
            raise PluginError(f"{label}: score() returned {type(scores).__name__}, not a tensor of {n} scores")
        if tuple(scores.shape) != (n,):
            raise PluginError(f"{label}: score() returned shape {list(scores.shape)} for a pool of {n} "
                              f"(need one score per sample, shape [{n}])")
        if not bool(torch.isfinite(scores.detach().float()).all()):
            raise PluginError(f"{label}: score() returned NaN or infinite scores")

    def _check_selection(self, sel: Any, n: int, budget: int, policy: str = "") -> Selection:
        """Enforce the selection contract the strategy declares.

        `exact_budget` (default True): exactly `budget` positions; False (or a
        variable-size policy such as `threshold`): 0..budget (an empty selection
        means nothing in this pool is worth training on).
        `with_replacement` (default False): positions are unique; True: repeats
        are allowed and weights (one per position) are required. Scores, when
        returned, are one finite value per pool sample.
        """
        label = self.plugin_label
        exact = bool(getattr(self.strategy_object, "exact_budget", True)) and policy not in VARIABLE_SIZE_POLICIES
        repeats = bool(getattr(self.strategy_object, "with_replacement", False))
        if not isinstance(sel, Selection):
            raise PluginError(f"{label} returned {type(sel).__name__} instead of a Selection")
        idx = torch.as_tensor(sel.indices).long().flatten()
        if exact and idx.numel() != budget:
            raise PluginError(f"{label} selected {idx.numel()} samples for a budget of {budget}")
        if not exact and not 0 <= idx.numel() <= budget:
            raise PluginError(f"{label} selected {idx.numel()} samples; a variable selection must hold 0 to {budget}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise PluginError(f"{label} returned pool positions outside [0, {n})")
        if not repeats and torch.unique(idx).numel() != idx.numel():
            raise PluginError(f"{label} selected the same sample twice")
        if sel.scores is not None:
            scores = torch.as_tensor(sel.scores)
            if scores.numel() != n:
                raise PluginError(f"{label} returned {scores.numel()} scores for a pool of {n}")
            if not bool(torch.isfinite(scores.float()).all()):
                raise PluginError(f"{label} produced NaN or infinite scores")
        if repeats and sel.weights is None:
            raise PluginError(f"{label} draws with replacement and must return weights")
        weights = None
        if sel.weights is not None:
            weights = torch.as_tensor(sel.weights).float().flatten()
            if weights.numel() != idx.numel() or not bool(torch.isfinite(weights).all()):
                raise PluginError(f"{label} returned {weights.numel()} weights (need {idx.numel()}, all finite)")
        diagnostics = sel.diagnostics
        if diagnostics is not None:
            try:
                diagnostics = json.loads(json.dumps(diagnostics, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise PluginError(f"{label} returned diagnostics that are not plain JSON ({exc})") from None
            if not isinstance(diagnostics, dict):
                raise PluginError(f"{label} returned diagnostics as {type(diagnostics).__name__}; use a dict of name: value")
        return Selection(indices=idx, weights=weights, scores=sel.scores, diagnostics=diagnostics)

    # -- training-side statistics ------------------------------------------------
    def report(self, ids: torch.Tensor, losses: torch.Tensor, true_class_probs: torch.Tensor | None,
               correct: torch.Tensor | None, progress: Progress | None = None) -> float:
        self.last_used = time.monotonic()
        if ids.dim() != 1 or losses.shape != ids.shape:
            raise InvalidArgument(f"report: ids {list(ids.shape)} and losses {list(losses.shape)} must be 1-D and aligned")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise InvalidArgument(f"report: ids must be integers, got {ids.dtype}")
        if not losses.is_floating_point() or not bool(torch.isfinite(losses).all()):
            raise InvalidArgument("report: losses must be finite floats")
        for name, t in (("true_class_probs", true_class_probs), ("correct", correct)):
            if t is not None and t.shape != ids.shape:
                raise InvalidArgument(f"report: {name} {list(t.shape)} must align with ids {list(ids.shape)}")
        t0 = time.perf_counter()
        with self.lock:
            self._check_open()
            if not self.strategy_object.uses_reports:
                return 0.0
            try:
                self.strategy_object.on_report(Report(
                    ids.long(), losses.float(), None if true_class_probs is None else true_class_probs.float(),
                    None if correct is None else correct.bool(), progress or Progress()))
            except DataselectError:
                raise
            except Exception as exc:
                raise PluginError(f"{self.plugin_label} raised {type(exc).__name__} on report: {exc}") from exc
        return time.perf_counter() - t0

    def _check_open(self) -> None:
        # Called under the lock: a call that raced a close must not touch freed state.
        if self.closed:
            raise NotFound("session closed: open a new session")

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.strategy_object = None  # type: ignore[assignment]
            self.model = None  # type: ignore[assignment]
            self.proxy = None
            self.irreducible = None
            self.irreducible_losses = {}
