"""A client written for the bare model, and Triton's wider gRPC API, through an unchanged tritonclient.grpc."""

from __future__ import annotations

import importlib.metadata

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from firewall.protocol import pb
from tests.conftest import address, make_settings, running_firewall, uint8_input

# Triton's methods the firewall does not serve: gRPC answers them UNIMPLEMENTED, as it does any unknown method.
UNSERVED = {
    "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    "TraceSetting", "LogSettings",
}  # fmt: skip


def own_input(images: np.ndarray) -> triton.InferInput:
    """uint8 [B, H, W, C] images as the bare model takes them: FP32 NCHW in [0, 1], named ``input``."""
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    tensor = triton.InferInput("input", list(nchw.shape), "FP32")
    tensor.set_data_from_numpy(nchw)
    return tensor


def test_a_bare_model_client_gets_a_one_hot_hard_label(client, mnist_heldout):
    images, _ = mnist_heldout
    batch = images[:16, :, :, None]
    expected = client.infer("mnist", [uint8_input(batch)]).as_numpy("label")
    logits = client.infer("mnist", [own_input(batch)]).as_numpy("logits")  # no output named: the model's own
    assert logits.dtype == np.float32 and logits.shape == (16, 10)
    assert set(np.unique(logits)) == {0.0, 1.0} and (logits.sum(axis=1) == 1).all()
    assert logits.argmax(axis=1).tolist() == expected.tolist()
    asked = [triton.InferRequestedOutput("logits")]
    assert np.array_equal(client.infer("mnist", [own_input(batch)], outputs=asked).as_numpy("logits"), logits)


def test_either_input_answers_either_output(client, mnist_heldout):
    images, _ = mnist_heldout
    batch = images[:4, :, :, None]
    both = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("logits")]
    for tensor in (uint8_input(batch), own_input(batch)):
        result = client.infer("mnist", [tensor], outputs=both)
        assert result.as_numpy("logits").argmax(axis=1).tolist() == result.as_numpy("label").tolist()
    assert client.infer("mnist", [uint8_input(batch)]).as_numpy("logits") is None  # `image` alone: `label` alone


def test_cifar10_takes_its_own_rgb_nchw_tensor():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with running_firewall(make_settings(models={"cifar10": {}})) as firewall:
        with triton.InferenceServerClient(address(firewall)) as client:
            metadata = client.get_model_metadata("cifar10")
            assert [(t.name, list(t.shape)) for t in metadata.inputs][1] == ("input", [-1, 3, 32, 32])
            expected = client.infer("cifar10", [uint8_input(images)]).as_numpy("label")
            logits = client.infer("cifar10", [own_input(images)]).as_numpy("logits")
    assert logits.shape == (4, 10) and logits.argmax(axis=1).tolist() == expected.tolist()


def test_unknown_output_is_invalid(client, mnist_heldout):
    images, _ = mnist_heldout
    with pytest.raises(InferenceServerException) as raised:
        client.infer("mnist", [own_input(images[:1, :, :, None])], outputs=[triton.InferRequestedOutput("probs")])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_model_config_and_repository_index(client):
    config = client.get_model_config("mnist").config
    assert config.name == "mnist" and config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("image", [28, 28, 1]), ("input", [1, 28, 28])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("label", [1]), ("logits", [10])]
    index = client.get_model_repository_index()
    assert [(m.name, m.state) for m in index.models] == [("mnist", "READY")]
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_config("secret")
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_server_metadata_names_the_version_and_extensions(client):
    metadata = client.get_server_metadata()
    assert metadata.version == importlib.metadata.version("inference-firewall")
    assert set(metadata.extensions) == {"binary_tensor_data", "model_configuration", "statistics"}


def test_statistics_count_requests_per_model_only(client, mnist_heldout):
    images, _ = mnist_heldout
    before = client.get_inference_statistics("mnist").model_stats[0]
    client.infer("mnist", [uint8_input(images[:3])], headers={"x-client-id": "counted"})
    with pytest.raises(InferenceServerException):
        client.infer("mnist", [own_input(np.zeros((1, 5, 5, 1), np.uint8))])
    after = client.get_inference_statistics("mnist").model_stats[0]
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.last_inference > 0
    assert [s.name for s in client.get_inference_statistics().model_stats] == ["mnist"]
    assert "counted" not in str(client.get_inference_statistics(as_json=True))


def test_every_unserved_triton_method_is_unimplemented(firewall):
    ours = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert UNSERVED == set(theirs) - ours
    with grpc.insecure_channel(address(firewall)) as channel:
        stub = triton_grpc.GRPCInferenceServiceStub(channel)
        for name in sorted(UNSERVED):
            request = getattr(triton_pb, theirs[name].input_type.name)()
            with pytest.raises(grpc.RpcError) as raised:
                getattr(stub, name)(request, timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
