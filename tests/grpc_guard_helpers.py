"""Raw gRPC calls and inference requests shared by the gRPC guard tests."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from boot_serve import access
from boot_serve.grpc_policy import SERVICE

MODEL = "boot_txt2img"
COMPOSING = "boot_unet"  # a model folder of the exported repository that clients may not reach
GOOD = ("a red circle", 0)
KEY = access.new_key()


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def call(url: str, method: str, request: bytes | object = b"", metadata=(), timeout: float | None = 30):
    """One raw unary call: (status code, details or response bytes)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(url) as channel:
        try:
            return grpc.StatusCode.OK, channel.unary_unary(path(method))(data, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            return err.code(), err.details()


def _inputs(prompt: str, seed: int) -> list:
    prompt_in = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    prompt_in.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    seed_in = grpcclient.InferInput("SEED", [1, 1], "INT64")
    seed_in.set_data_from_numpy(np.array([[seed]], dtype=np.int64))
    return [prompt_in, seed_in]


def infer_request(model: str = MODEL, prompt: str = GOOD[0], seed: int = GOOD[1]) -> service_pb2.ModelInferRequest:
    """The ModelInferRequest tritonclient sends for one prompt."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for item in _inputs(prompt, seed):
        request.inputs.extend([item._get_tensor()])
        request.raw_input_contents.extend([item._get_content()])
    return request


def image_of(response: service_pb2.ModelInferResponse) -> np.ndarray:
    return grpcclient.InferResult(response).as_numpy("IMAGE")


def status_of(err: InferenceServerException) -> str:
    return err.status() or ""


def _held_stream(channel):
    """A ModelStreamInfer call whose requests the test feeds: (queue to put bytes or None, call)."""
    requests: queue.Queue = queue.Queue()

    def feed():
        while (item := requests.get()) is not None:
            yield item
    return requests, channel.stream_stream(path("ModelStreamInfer"))(feed())


def _stream_error(stream_call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream_call:
            pass
    return err.value
