"""What the gRPC guard lets through, and in what form (boot_serve.grpc_guard applies it per call).

Service inference.GRPCInferenceService; boot_serve.access is the shared policy:
- public: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
  ModelInfer, ModelStreamInfer;
- operator: ModelStatistics, when the call's metadata carries access.KEY_HEADER (or Triton's name
  for it, TRITON_KEY_METADATA) equal to the operator key; Triton, started with
  access.triton_restriction_args, checks the key again;
- nothing else: the control methods (repository index/load/unload, system and CUDA shared memory,
  trace and log settings) are refused with PERMISSION_DENIED, any other path (unknown service or
  method, or a known one spelled differently) with UNIMPLEMENTED, before a byte goes to Triton.

Each request message is parsed with the protobuf classes tritonclient ships
(tritonclient.grpc.service_pb2): one that does not parse is refused with INVALID_ARGUMENT, one
naming a model that is not served with NOT_FOUND, an inference request with a tensor in shared
memory with PERMISSION_DENIED (registration is closed; HTTP answers it 403), and Triton gets the
message re-serialized from what was parsed (unknown fields dropped, `reserialize`), under the
canonical method path, with only
the metadata `forwarded_metadata` lists (the operator key for ModelStatistics, Triton's documented
`triton_grpc_error` stream option).
"""

from __future__ import annotations

import ipaddress
import urllib.parse

import grpc
from tritonclient.grpc import service_pb2

from boot_serve import access

SERVICE = "inference.GRPCInferenceService"
PUBLIC_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                  "ModelInfer", "ModelStreamInfer")
OPERATOR_METHODS = ("ModelStatistics",)
# Every other method of the service, as tritonclient's copy of Triton's protocol lists them, plus
# those this server is known to offer (in case an older protocol file lacks one).
CLOSED_METHODS = tuple(sorted((
    {m.name for m in service_pb2.DESCRIPTOR.services_by_name[SERVICE.split(".")[-1]].methods}
    | {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
       "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
       "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings"})
    - set(PUBLIC_METHODS) - set(OPERATOR_METHODS)))
STREAM_METHODS = (f"/{SERVICE}/ModelStreamInfer",)

# Request message class of each allowed method, and the field that names a model ("" for none).
REQUESTS = {
    "ServerLive": (service_pb2.ServerLiveRequest, ""),
    "ServerReady": (service_pb2.ServerReadyRequest, ""),
    "ServerMetadata": (service_pb2.ServerMetadataRequest, ""),
    "ModelReady": (service_pb2.ModelReadyRequest, "name"),
    "ModelMetadata": (service_pb2.ModelMetadataRequest, "name"),
    "ModelConfig": (service_pb2.ModelConfigRequest, "name"),
    "ModelInfer": (service_pb2.ModelInferRequest, "model_name"),
    "ModelStreamInfer": (service_pb2.ModelInferRequest, "model_name"),
    "ModelStatistics": (service_pb2.ModelStatisticsRequest, "name"),  # "" = all models: operators only
}

# Triton's gRPC endpoint reads the header of a restricted protocol under this prefix (tritonserver 2.51
# refuses keyless statistics with "expecting header 'triton-grpc-protocol-boot-operator-key'"), so
# the key goes to Triton under TRITON_KEY_METADATA. Callers present it as access.KEY_HEADER, as over
# HTTP, or under Triton's own name.
TRITON_KEY_METADATA = access.TRITON_GRPC_KEY_HEADER


class Refused(Exception):
    """A call the guard answers itself, with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def client_address(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555",
    "ipv6:%5B::1%5D:5555", "unix:/path"): one per client host; IPv4-mapped IPv6 as IPv4."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]") if rest.startswith("[") else rest
        try:
            ip = ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            return host
        return str(ip.ipv4_mapped or ip)
    return kind or peer


def check_operator(metadata, operator_key: str | None) -> None:
    """Refused unless the call's `metadata` carries the operator key exactly once."""
    keys = [v for k, v in metadata if k in (access.KEY_HEADER, TRITON_KEY_METADATA)]
    if len(keys) != 1 or not access.key_matches(keys[0], operator_key):
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"ModelStatistics is for operators: it needs the operator key in the "
                      f"'{access.KEY_HEADER}' metadata")


def reserialize(name: str, data: bytes, models: tuple[str, ...] | None) -> bytes:
    """The request message of method `name` re-serialized from what parsed, unknown fields dropped;
    Refused when it does not parse or names a model outside `models` (None: any)."""
    cls, field = REQUESTS[name]
    try:
        message = cls.FromString(data)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError, or worse for hostile bytes
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the {name} request is not a valid {cls.DESCRIPTOR.full_name} message") from err
    message.DiscardUnknownFields()
    if cls is service_pb2.ModelInferRequest and any(
            key.startswith("shared_memory_") for tensor in (*message.inputs, *message.outputs)
            for key in tensor.parameters):
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      "shared memory is closed on this server: send tensors in the request")
    model = getattr(message, field) if field else ""
    if models is not None and (model or name != "ModelStatistics") and field and model not in models:
        raise Refused(grpc.StatusCode.NOT_FOUND,
                      f"model {model[:200]!r} is not served here (served: {', '.join(models)})")
    return message.SerializeToString()


def forwarded_metadata(name: str, metadata, operator_key: str | None) -> list[tuple[str, str]]:
    """The only metadata Triton gets: the operator key on ModelStatistics (checked before, sent under
    Triton's name for it), and `triton_grpc_error: true` on streams (Triton's documented option to
    end a stream with a gRPC status on its first error). Anything else the caller sent stays here."""
    if name in OPERATOR_METHODS:
        return [(TRITON_KEY_METADATA, operator_key)]
    if name == "ModelStreamInfer" and any(k == "triton_grpc_error" and str(v).lower() == "true"
                                          for k, v in metadata):
        return [("triton_grpc_error", "true")]
    return []
