"""Open Inference Protocol stubs generated from proto/inference.proto by proto/generate.py."""

from firewall.protocol import inference_pb2 as pb
from firewall.protocol import inference_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
