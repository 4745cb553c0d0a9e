"""The names of dataselect's concepts, in one place and free of heavy imports.

Command lines, the plugin manager and the engine all take their choice
lists from here, so a name is spelled once and `--help` needs no torch.
"""

from __future__ import annotations

from dataselect.errors import InvalidArgument

#: Training modes a strategy may default to (`--mode`).
MODES = ("online", "subset", "weighted")

#: Selection policies that turn scores into a selection (`--policy`).
POLICIES = ("topk", "class_balanced", "sample", "threshold")
#: Policies that keep a variable number of samples (at most the budget) whatever the strategy declares.
VARIABLE_SIZE_POLICIES = frozenset({"threshold"})

#: Signals from one forward pass (the engine computes them under inference mode).
FORWARD_SIGNALS = frozenset({"logits", "probs", "loss", "features", "grad_norm_last", "boundary_margin",
                             "logit_margin"})
#: Signals from one backward pass of the summed loss with respect to the inputs.
GRAD_SIGNALS = frozenset({"input_grad_norm"})
#: Signals that need every sample's own parameter gradient.
PER_SAMPLE_GRAD_SIGNALS = frozenset({"grad_norm_full"})
#: Signals the scoring session supplies itself rather than the engine: `irreducible_loss` is each sample's
#: loss under the irreducible-loss model the trainer pushed (RHO-LOSS), computed once per id and cached.
SESSION_SIGNALS = frozenset({"irreducible_loss"})
#: Every signal a strategy may ask for (`Strategy.signals`).
SIGNALS = tuple(sorted(FORWARD_SIGNALS | GRAD_SIGNALS | PER_SAMPLE_GRAD_SIGNALS | SESSION_SIGNALS))

#: The auxiliary loss that trains DynaMS's parameter-sharing proxy jointly (`dataselect.proxy`).
SLIM_PROXY = "slim_proxy"

#: Autocast precisions for forward signals (`--precision`, `--score-precision`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Dtypes floating weights may travel in when pushed to a server (`--checkpoint-dtype`).
CHECKPOINT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: What the trainer does when the scoring server goes away (`--on-server-failure`).
ON_SERVER_FAILURE = ("retry", "fallback")
#: Learning-rate schedules of `dataselect-train` (`--lr-schedule`).
SCHEDULES = ("constant", "cosine", "onecycle")

#: The largest gRPC message either end sends or accepts unless told otherwise (`dataselect-server
#: --max-message-mb`, `RemoteScorer(max_message_bytes=...)`); both ends must agree.
DEFAULT_MAX_MESSAGE_MB = 64
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_MB * 2**20


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel and server options for the message-size limit (the same on both ends)."""
    return [("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes))]


#: Words a boolean option or flag may be written as (any case, surrounding spaces ignored).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: object) -> bool | None:
    """True for 1/true/yes/on, False for 0/false/no/off (a bool is itself), None for anything else."""
    if isinstance(text, bool):
        return text
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    return True if t in TRUE_WORDS else False if t in FALSE_WORDS else None


def parse_micro_batch(value: int | str) -> int | str:
    """'auto' or a positive integer (as int or text) -> 'auto' or the int; anything else is refused."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = int(text)
        except ValueError:
            raise InvalidArgument(f"micro-batch must be 'auto' or a positive integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"micro-batch must be 'auto' or a positive integer, got {value!r}")
    return value
