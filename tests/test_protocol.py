"""The generated stubs match proto/, and the proto matches what standard clients put on the wire."""

from __future__ import annotations

import sys
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as model_config_pb
from tritonclient.grpc import service_pb2 as triton_pb

from firewall.protocol import pb

ROOT = Path(__file__).resolve().parent.parent
SHARED_MESSAGES = [
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
    "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
    "ModelMetadataRequest", "ModelMetadataResponse", "InferParameter", "InferTensorContents",
    "ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse",
    "ModelConfigRequest", "ModelConfigResponse", "ModelStatisticsRequest", "ModelStatisticsResponse",
    "RepositoryIndexRequest", "RepositoryIndexResponse",
]  # fmt: skip
# Triton's messages the firewall fills in only partly: every field it has is Triton's field.
PARTIAL_MESSAGES = ["ModelConfig", "ModelInput", "ModelOutput", "ModelTensorReshape", "ModelStatistics", "InferStatistics", "StatisticDuration"]


def test_committed_stubs_match_the_proto(tmp_path):
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        from generate import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    for generated in sorted(tmp_path.glob("*.py")):
        committed = ROOT / "firewall" / "protocol" / generated.name
        assert committed.read_text() == generated.read_text(), f"{committed} is stale: run python proto/generate.py"


def _fields(descriptor) -> dict:
    fields = {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            fields[nested.name] = _fields(nested)
    return fields


def test_messages_are_wire_compatible_with_tritonclient():
    for name in SHARED_MESSAGES:
        ours = pb.DESCRIPTOR.message_types_by_name[name]
        assert _fields(ours) == _fields(_defined(name)), name


def _defined(name: str):
    """A message of Triton's service or model configuration protos."""
    return triton_pb.DESCRIPTOR.message_types_by_name.get(name) or model_config_pb.DESCRIPTOR.message_types_by_name[name]


def test_partial_messages_are_subsets_of_tritons():
    for name in PARTIAL_MESSAGES:
        ours, theirs = _fields(pb.DESCRIPTOR.message_types_by_name[name]), _fields(_defined(name))
        assert ours.items() <= theirs.items(), name
    for enum in ("DataType",):
        values = {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name[enum].values}
        assert values.items() <= {v.name: v.number for v in model_config_pb.DESCRIPTOR.enum_types_by_name[enum].values}.items()


def test_service_methods_match_tritonclient():
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        twin = theirs.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == (twin.input_type.name, twin.output_type.name)
        assert (method.client_streaming, method.server_streaming) == (twin.client_streaming, twin.server_streaming)
