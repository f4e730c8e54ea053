"""Triton Python model that runs one ONNX graph of the repository with ONNX Runtime.

The same file serves `text_encoder`, `boot_unet` and `vae_decoder` on the CPU tritonserver
(the one in the nvidia-pytriton wheel has no onnxruntime backend). Everything it needs comes
from config.pbtxt: tensor names and dims (identical to the graph's, docs/interfaces.md),
`reshape`, and the parameters `onnx_file` (default model.onnx), `providers` (comma-separated
ONNX Runtime providers, default CPUExecutionProvider) and `intra_op_thread_count` (0: ORT default).

One execute = one graph run over the whole dynamic batch: the requests' tensors are stacked
along the batch axis and the outputs split back, one response per request. Inputs were
checked upstream (tokenizer, noise); a failing run fails each request of the batch with
the error, and the model keeps serving.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        # Per-request dims as the graph sees them: `reshape` where the config has one.
        self.inputs = [(t["name"], [int(d) for d in (t["reshape"].get("shape", []) if "reshape" in t else t["dims"])])
                       for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        # Spinning worker threads burn the cores that the other models of the ensemble need.
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
        providers = [p.strip() for p in params.get("providers", "CPUExecutionProvider").split(",") if p.strip()]
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def execute(self, requests):
        sizes, feeds = [], {}
        for name, dims in self.inputs:
            parts = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            feeds[name] = np.concatenate([p.reshape(p.shape[0], *dims) for p in parts])  # (sum B, *dims)
            sizes = [p.shape[0] for p in parts]
        try:
            outputs = self.session.run(self.outputs, feeds)
        except Exception as err:  # noqa: BLE001 - reported to every request of the batch
            error = pb_utils.TritonError(f"{self.name}: ONNX Runtime failed on a batch of {sum(sizes)}: {err}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                 for name, out in zip(self.outputs, outputs)]))
            start += size
        return responses
