"""Regenerate the Python code for the gRPC contract.

Run `python proto/generate.py` after editing any `.proto` file under
`proto/dataselect/v1/`, and commit the result. The generated modules are
committed so that installing dataselect needs no code generator; the test
`tests/test_proto_drift.py` regenerates them into a temporary directory and
fails on any difference, so the committed code can never drift from the
contract.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "dataselect" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out_dir."""
    try:
        from grpc_tools import protoc
        import grpc_tools
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise SystemExit('grpcio-tools is needed to regenerate: pip install -e ".[dev]"') from exc
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "dataselect" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    written = generate(PROTO_ROOT)
    for path in written:
        print(path.relative_to(PROTO_ROOT))


if __name__ == "__main__":
    sys.exit(main())
