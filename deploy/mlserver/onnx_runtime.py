"""An MLServer runtime that serves an ONNX classifier: the request's first tensor in, every output back.

This is the unprotected model server the firewall sits in front of, as a user would run it:
MLServer speaks the Open Inference Protocol on its own loopback-only gRPC port. The Kubernetes
mlserver overlay ships it in the model's folder (see kustomization.yaml here), and the tests'
upstream harness (tests/upstream.py) runs it the same way. model-settings.json:

    {"name": "mnist", "implementation": "onnx_runtime.OnnxRuntime", "parameters": {"uri": "./1/model.onnx"}}

A relative uri is resolved against the folder of model-settings.json, an absolute one is used as is.
ONNX Runtime comes with the full seldonio/mlserver image (its HuggingFace runtime depends on
optimum[onnxruntime]).
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        batch = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        results = self._session.run(self._outputs, {self._input: batch})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results)],
        )
