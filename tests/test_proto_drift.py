"""The committed generated code must equal what proto/generate.py produces now."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency")
    gen = _load_generator()
    written = gen.generate(tmp_path)
    assert written, "the generator produced nothing"
    for fresh in written:
        committed = REPO / "proto" / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed.name} is not committed: run python proto/generate.py"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed.name} differs from the .proto: run `python proto/generate.py` and commit"
        )


def test_every_proto_message_is_importable():
    from dataselect.v1 import selection_pb2 as pb

    names = set(pb.DESCRIPTOR.message_types_by_name)
    assert {"Tensor", "SelectRequest", "SelectResponse", "CheckpointChunk", "ReportRequest"} <= names
    assert "Selection" in pb.DESCRIPTOR.services_by_name
