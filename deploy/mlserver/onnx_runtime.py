"""An MLServer runtime that serves an ONNX classifier: FP32 `input` in, FP32 `logits` out.

This is the unprotected model server the firewall sits in front of, as a user would run it:
MLServer speaks the same Open Inference Protocol on its own (loopback-only) gRPC port.
model-settings.json: {"name": "mnist", "implementation": "onnx_runtime.OnnxRuntime",
                      "parameters": {"uri": "/path/to/model.onnx"}}
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        batch = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        results = self._session.run(self._outputs, {self._input: batch})
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results)],
        )
