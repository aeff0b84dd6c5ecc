"""Generate the Python stubs in firewall/protocol/ from proto/inference.proto.

    python proto/generate.py            # writes firewall/protocol/inference_pb2*.py
    python proto/generate.py OUT_DIR    # writes them elsewhere (the drift test compares)

The messages are registered in a private descriptor pool rather than protobuf's default one:
tritonclient registers the same `inference.*` message names, and two definitions of one name in
the default pool make the second import fail. On the wire only the service path
(`/inference.GRPCInferenceService/...`) and field numbers matter, so both coexist in one process.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "inference.proto"
PACKAGE = "firewall/protocol"


def generate(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Mapping proto/ onto firewall/protocol/ makes the generated imports package-absolute.
        code = protoc.main(
            ["protoc", f"-I{PACKAGE}={PROTO.parent}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"{PACKAGE}/{PROTO.name}"]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for generated in sorted((Path(tmp) / PACKAGE).glob("*.py")):
            text = generated.read_text()
            text = text.replace("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()")
            (out_dir / generated.name).write_text(text)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / PACKAGE)
