"""Hung upstream (issue 12 item 4): SIGSTOP a real MLServer behind the firewall; time to NOT_SERVING, call latency while hung, time to answer after SIGCONT.

    python benchmarks/hung_upstream.py
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import os, signal, time, numpy as np, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.conftest import running_firewall, address
from tests.test_upstream import upstream_settings
from tests.upstream import mlserver, PROCESS_GROUPS
from models.runtime import bundled_model_path
from firewall.protocol import pb, pb_grpc
img = np.zeros((1,28,28), np.uint8)
req = pb.ModelInferRequest(model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1,28,28])], raw_input_contents=[img.tobytes()])
with mlserver("mnist", bundled_model_path("mnist")) as up:
    s = upstream_settings(up); s = s.model_copy(update={})
    with running_firewall(upstream_settings(up, timeout_s=2.0)) as fw, grpc.insecure_channel(address(fw)) as ch:
        health = health_pb2_grpc.HealthStub(ch); stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(req, timeout=10)
        os.killpg(PROCESS_GROUPS[up], signal.SIGSTOP); t0 = time.monotonic()
        while health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING: time.sleep(0.02)
        print(f"NOT_SERVING after {time.monotonic()-t0:.2f} s")
        lat = []
        for _ in range(20):
            t = time.monotonic()
            try: stub.ModelInfer(req, timeout=10); c="OK"
            except grpc.RpcError as e: c = e.code().name
            lat.append((c, time.monotonic()-t))
        print("calls while hung:", sorted(set(c for c,_ in lat)), "max %.3f s median %.3f s" % (max(l for _,l in lat), sorted(l for _,l in lat)[10]))
        os.killpg(PROCESS_GROUPS[up], signal.SIGCONT); t0 = time.monotonic()
        while True:
            try: stub.ModelInfer(req, timeout=10); break
            except grpc.RpcError: time.sleep(0.02)
        print(f"answered again {time.monotonic()-t0:.2f} s after SIGCONT")
