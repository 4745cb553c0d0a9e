from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "kwargs_json", "exported")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kwargs_json: str
    exported: bytes
    def __init__(self, name: _Optional[str] = ..., kwargs_json: _Optional[str] = ..., exported: _Optional[bytes] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("strategy", "options_json", "model", "seed", "num_classes", "dataset", "dataset_size", "policy", "input_scale")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    options_json: str
    model: ModelSpec
    seed: int
    num_classes: int
    dataset: str
    dataset_size: int
    policy: str
    input_scale: float
    def __init__(self, strategy: _Optional[str] = ..., options_json: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., seed: _Optional[int] = ..., num_classes: _Optional[int] = ..., dataset: _Optional[str] = ..., dataset_size: _Optional[int] = ..., policy: _Optional[str] = ..., input_scale: _Optional[float] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "strategy", "resolved_options_json", "default_mode", "policy", "device", "signals", "uses_reports", "proxy", "auxiliary_loss")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    USES_REPORTS_FIELD_NUMBER: _ClassVar[int]
    PROXY_FIELD_NUMBER: _ClassVar[int]
    AUXILIARY_LOSS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    strategy: str
    resolved_options_json: str
    default_mode: str
    policy: str
    device: str
    signals: _containers.RepeatedScalarFieldContainer[str]
    uses_reports: bool
    proxy: ProxySpec
    auxiliary_loss: AuxiliaryLoss
    def __init__(self, session_id: _Optional[str] = ..., strategy: _Optional[str] = ..., resolved_options_json: _Optional[str] = ..., default_mode: _Optional[str] = ..., policy: _Optional[str] = ..., device: _Optional[str] = ..., signals: _Optional[_Iterable[str]] = ..., uses_reports: _Optional[bool] = ..., proxy: _Optional[_Union[ProxySpec, _Mapping]] = ..., auxiliary_loss: _Optional[_Union[AuxiliaryLoss, _Mapping]] = ...) -> None: ...

class AuxiliaryLoss(_message.Message):
    __slots__ = ("name", "weight", "params_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    params_json: str
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., params_json: _Optional[str] = ...) -> None: ...

class ProxySpec(_message.Message):
    __slots__ = ("width_ratio", "loss_weight")
    WIDTH_RATIO_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    width_ratio: float
    loss_weight: float
    def __init__(self, width_ratio: _Optional[float] = ..., loss_weight: _Optional[float] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("session_id", "version", "total_bytes", "path", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    total_bytes: int
    path: str
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadCheckpointResponse(_message.Message):
    __slots__ = ("version", "bytes_received", "load_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    bytes_received: int
    load_seconds: float
    def __init__(self, version: _Optional[int] = ..., bytes_received: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("epoch", "step", "total_epochs", "fraction")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    total_epochs: int
    fraction: float
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., total_epochs: _Optional[int] = ..., fraction: _Optional[float] = ...) -> None: ...

class SelectRequest(_message.Message):
    __slots__ = ("session_id", "ids", "inputs", "labels", "budget", "progress", "return_scores", "policy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCORES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ids: Tensor
    inputs: Tensor
    labels: Tensor
    budget: int
    progress: Progress
    return_scores: bool
    policy: str
    def __init__(self, session_id: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., budget: _Optional[int] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., return_scores: _Optional[bool] = ..., policy: _Optional[str] = ...) -> None: ...

class ServerCost(_message.Message):
    __slots__ = ("compute_seconds", "codec_seconds", "queue_seconds", "samples_scored")
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CODEC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SCORED_FIELD_NUMBER: _ClassVar[int]
    compute_seconds: float
    codec_seconds: float
    queue_seconds: float
    samples_scored: int
    def __init__(self, compute_seconds: _Optional[float] = ..., codec_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., samples_scored: _Optional[int] = ...) -> None: ...

class SelectResponse(_message.Message):
    __slots__ = ("selected_ids", "weights", "scores", "checkpoint_version", "cost", "diagnostics_json")
    SELECTED_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_JSON_FIELD_NUMBER: _ClassVar[int]
    selected_ids: Tensor
    weights: Tensor
    scores: Tensor
    checkpoint_version: int
    cost: ServerCost
    diagnostics_json: str
    def __init__(self, selected_ids: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., checkpoint_version: _Optional[int] = ..., cost: _Optional[_Union[ServerCost, _Mapping]] = ..., diagnostics_json: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("session_id", "ids", "losses", "true_class_probs", "correct", "progress")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TRUE_CLASS_PROBS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ids: Tensor
    losses: Tensor
    true_class_probs: Tensor
    correct: Tensor
    progress: Progress
    def __init__(self, session_id: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., losses: _Optional[_Union[Tensor, _Mapping]] = ..., true_class_probs: _Optional[_Union[Tensor, _Mapping]] = ..., correct: _Optional[_Union[Tensor, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("samples", "compute_seconds")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    samples: int
    compute_seconds: float
    def __init__(self, samples: _Optional[int] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StrategyInfo(_message.Message):
    __slots__ = ("name", "description", "default_mode", "default_policy", "plugin", "options_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    default_mode: str
    default_policy: str
    plugin: str
    options_json: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., default_mode: _Optional[str] = ..., default_policy: _Optional[str] = ..., plugin: _Optional[str] = ..., options_json: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("version", "device", "strategies", "models", "max_message_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    device: str
    strategies: _containers.RepeatedCompositeFieldContainer[StrategyInfo]
    models: _containers.RepeatedScalarFieldContainer[str]
    max_message_bytes: int
    def __init__(self, version: _Optional[str] = ..., device: _Optional[str] = ..., strategies: _Optional[_Iterable[_Union[StrategyInfo, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
