"""Client of the boot text-to-image model on Triton (`boot_txt2img`, docs/interfaces.md).

    from boot_serve import access
from boot_serve.client import Client
    with Client("127.0.0.1:8000") as client:                      # or Client("127.0.0.1:8001", "grpc")
        images = client.generate(["a red circle"], seeds=[0])     # list[PIL.Image.Image]
        results = client.generate_many(prompts, seeds, return_errors=True)

    python -m boot_serve.client "a red circle" --seed 0 --out img.png [--url] [--protocol] [--guidance]

`generate` sends the prompts in requests of up to max_batch_size prompts (fewest round trips;
one bad prompt fails its whole request). `generate_many` sends one request per prompt, all in
flight at once, so that Triton's dynamic batcher groups them with everyone else's and a bad
prompt fails alone. Errors:
- `ServerUnavailableError` (also a ConnectionError): no server at the URL, or the model is not
  loaded / not ready;
- `RequestError` (also a ValueError): the server rejected a request (empty or over-long prompt, a
  prompt of invisible characters only, non-UTF-8 bytes, negative seed, NaN or out-of-range guidance,
  wrong dtype or shape, batch over max_batch_size); `.index` is the prompt it belongs to in
  `generate_many`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from boot.cli import Parser
from boot_serve import access

MODEL = "boot_txt2img"
PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
MAX_SEED = 2**63 - 1


class ClientError(RuntimeError):
    """Anything that kept the client from getting its images."""


class ServerUnavailableError(ClientError, ConnectionError):
    """No Triton server answers at the URL, or the model is not ready there."""


class RequestError(ClientError, ValueError):
    """The server rejected a request; `status` is Triton's status, `index` the prompt index
    (generate_many) or the index of the first prompt of the rejected request (generate)."""

    def __init__(self, message: str, status: str | None = None, index: int | None = None):
        super().__init__(message)
        self.status = status
        self.index = index


def _lib(protocol: str):
    if protocol == "http":
        import tritonclient.http as lib
    elif protocol == "grpc":
        import tritonclient.grpc as lib
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return lib


class Client:
    """Talks to `model` on the Triton server at `url` ("host:port", no scheme) over HTTP or gRPC.

    `concurrency`: requests in flight at once in generate_many. `timeout`: seconds for one
    request (network timeout) and for connecting. `operator_key`: opens `statistics()` on a
    server that restricts them (boot_serve.access; default: $BOOT_OPERATOR_KEY). Like tritonclient's
    clients underneath, a Client is not meant to be shared between threads: one per thread.
    """

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = MODEL,
                 concurrency: int = 8, timeout: float = 120.0, operator_key: str | None = None):
        self.protocol = protocol
        self.operator_key = operator_key or access.read_key()
        self.lib = _lib(protocol)
        self.url = (url or DEFAULT_URLS[protocol]).removeprefix("http://").removeprefix("https://")
        self.model = model
        self.concurrency = max(1, int(concurrency))
        self.timeout = timeout
        self._client = self._connect()
        self._stale = False  # set when the server went away: reconnect before the next call
        self._max_batch_size: int | None = None
        self._checked = False

    # --- connection -----------------------------------------------------------------------------
    def _connect(self):
        if self.protocol == "http":
            return self.lib.InferenceServerClient(self.url, concurrency=self.concurrency,
                                                  connection_timeout=self.timeout, network_timeout=self.timeout)
        # tritonclient's message-size limits (its keepalive options are gRPC's defaults) plus a
        # subchannel pool of this channel's own: gRPC shares connections between channels to the
        # same address by default, so a rebuilt channel would inherit the dead server's reconnect
        # backoff and fail with "connection refused" for a while after the server is back.
        options = [("grpc.max_send_message_length", self.lib.MAX_GRPC_MESSAGE_SIZE),
                   ("grpc.max_receive_message_length", self.lib.MAX_GRPC_MESSAGE_SIZE),
                   ("grpc.use_local_subchannel_pool", 1)]
        return self.lib.InferenceServerClient(self.url, channel_args=options)

    def _fresh(self):
        """The tritonclient client, rebuilt after the server went away: a gRPC channel that saw the
        server die sits in exponential reconnect backoff (seconds to minutes) and fails calls
        meanwhile, and an HTTP pool may hold dead sockets; a new one (with its own connections,
        see _connect) connects at once."""
        if self._stale:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client, self._stale, self._checked = self._connect(), False, False
        return self._client

    def _unavailable(self, err: Exception) -> ServerUnavailableError:
        self._stale = True
        return ServerUnavailableError(
            f"no Triton server answers at {self.protocol}://{self.url} ({_message(err)}). Start one with "
            "`python -m boot_serve.serve --repository model_repository`")

    def ready(self) -> bool:
        """Server live and the model ready (never raises)."""
        try:
            client = self._fresh()
            return bool(client.is_server_live() and client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            self._stale = True  # the next probe or call starts from a fresh connection
            return False

    def wait_ready(self, timeout: float = 60.0) -> Client:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                self.check()
            time.sleep(0.5)
        return self

    def check(self) -> None:
        """Raise ServerUnavailableError unless the server is live and the model ready."""
        try:
            live = self._fresh().is_server_live()
        except Exception as err:  # noqa: BLE001 - connection refused, DNS, timeouts: all "unavailable"
            raise self._unavailable(err) from err
        if not live:
            raise ServerUnavailableError(f"the Triton server at {self.url} is not live")
        try:
            ready = self._client.is_model_ready(self.model)
        except Exception as err:  # noqa: BLE001
            raise self._unavailable(err) from err
        if not ready:
            raise ServerUnavailableError(f"model {self.model!r} is not loaded or not ready on {self.url}; "
                                         "see the server's log (tritonserver prints why a model failed to load)")
        self._checked = True

    @property
    def max_batch_size(self) -> int:
        if self._max_batch_size is None:
            config = self._config()
            self._max_batch_size = int(config.get("max_batch_size", config.get("config", {}).get("max_batch_size", 1)))
        return self._max_batch_size

    def guidance(self) -> tuple[tuple[float, float], float] | None:
        """(guidance range, default guidance) the served student takes, from the parameters of the
        model's config (written by `python -m boot_serve.triton_repo`); None if the config has none."""
        params = {k: v.get("string_value") for k, v in self._config().get("parameters", {}).items()}
        try:
            return (float(params["guidance_min"]), float(params["guidance_max"])), float(params["guidance_scale"])
        except (KeyError, TypeError, ValueError):
            return None

    def _config(self) -> dict:
        """The model's config as JSON (both protocols), once the server is checked."""
        self.check()
        config = self._client.get_model_config(self.model)
        return config if self.protocol == "http" else self._grpc_json(config)

    @staticmethod
    def _grpc_json(message) -> dict:
        from google.protobuf import json_format

        data = json_format.MessageToDict(message, preserving_proto_field_name=True)
        return data.get("config", data)

    def statistics(self, model: str | None = None) -> dict:
        """Triton's inference statistics of a model (JSON form, both protocols); the server answers
        them to operators only (`operator_key`)."""
        headers = {access.KEY_HEADER: self.operator_key} if self.operator_key else None
        if self.protocol == "http":
            return self._client.get_inference_statistics(model or self.model, headers=headers)
        if headers:  # the guard reads the plain name; Triton's own gRPC port its prefixed one
            headers[access.TRITON_GRPC_KEY_HEADER] = self.operator_key
        return self._client.get_inference_statistics(model or self.model, headers=headers, as_json=True)

    # --- requests -------------------------------------------------------------------------------
    def _inputs(self, prompts: Sequence[str | bytes], seeds: Sequence[int], guidance) -> list:
        n = len(prompts)
        prompt = self.lib.InferInput("PROMPT", [n, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[p.encode("utf-8") if isinstance(p, str) else bytes(p)]
                                             for p in prompts], dtype=object))
        seed = self.lib.InferInput("SEED", [n, 1], "INT64")
        seed.set_data_from_numpy(np.array([[s] for s in seeds], dtype=np.int64))
        inputs = [prompt, seed]
        if guidance is not None:
            scale = self.lib.InferInput("GUIDANCE_SCALE", [n, 1], "FP32")
            scale.set_data_from_numpy(np.asarray(guidance, dtype=np.float32).reshape(n, 1))
            inputs.append(scale)
        return inputs

    def _error(self, err: Exception, index: int | None) -> ClientError:
        from tritonclient.utils import InferenceServerException

        if isinstance(err, InferenceServerException):
            status = str(err.status() or "")
            # 502/503: the HTTP guard of boot_serve.serve answers for a tritonserver that is restarting
            if status in ("StatusCode.UNAVAILABLE", "502", "503") or "failed to connect" in _message(err).lower():
                return self._unavailable(err)
            return RequestError(_message(err), status, index)
        if isinstance(err, (OSError, ConnectionError, TimeoutError)):
            return self._unavailable(err)
        return ClientError(f"{type(err).__name__}: {err}")

    def _outputs(self):
        return [self.lib.InferRequestedOutput("IMAGE")]

    def infer(self, prompts: Sequence[str | bytes], seeds: Sequence[int], guidance_scale=None,
              index: int | None = None) -> np.ndarray:
        """One request: (B, H, W, 3) uint8 images, B = len(prompts) <= max_batch_size."""
        try:
            result = self._fresh().infer(self.model, self._inputs(prompts, seeds, guidance_scale),
                                        outputs=self._outputs(),
                                        **({"client_timeout": self.timeout} if self.protocol == "grpc" else {}))
        except Exception as err:  # noqa: BLE001 - mapped to this module's error types
            raise self._error(err, index) from err
        return result.as_numpy("IMAGE")

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 guidance_scale: float | Sequence[float] | None = None) -> list[Image.Image]:
        """Images for (prompt, seed) pairs, in requests of up to max_batch_size prompts.
        guidance_scale: None (the student's default), one value, or one per prompt."""
        prompts, seeds, guidance = _check(prompts, seeds, guidance_scale)
        step = self.max_batch_size
        images: list[Image.Image] = []
        for lo in range(0, len(prompts), step):
            part = None if guidance is None else guidance[lo:lo + step]
            arrays = self.infer(prompts[lo:lo + step], seeds[lo:lo + step], part, index=lo)
            images += [Image.fromarray(a) for a in arrays]
        return images

    def generate_many(self, prompts: Sequence[str], seeds: Sequence[int],
                      guidance_scale: float | Sequence[float] | None = None,
                      return_errors: bool = False) -> list[Image.Image | ClientError]:
        """One request per prompt, up to `concurrency` in flight. Raises the first error, or
        with `return_errors=True` puts each request's error in its place in the list."""
        prompts, seeds, guidance = _check(prompts, seeds, guidance_scale)
        self._fresh()
        if not self._checked:
            self.check()
        requests = [self._inputs([p], [s], None if guidance is None else guidance[i:i + 1])
                    for i, (p, s) in enumerate(zip(prompts, seeds))]
        run = self._many_grpc if self.protocol == "grpc" else self._many_http
        results = run(requests)
        if not return_errors:
            for r in results:
                if isinstance(r, ClientError):
                    raise r
        return results

    def _image_or_error(self, get_result, index: int):
        try:
            return Image.fromarray(get_result().as_numpy("IMAGE")[0])
        except Exception as err:  # noqa: BLE001 - mapped to this module's error types
            return self._error(err, index)

    def _many_http(self, requests: list) -> list:
        # The HTTP client's pool holds `concurrency` requests in flight; async_infer waits for a slot.
        handles = []
        for inputs in requests:
            try:
                handle = self._client.async_infer(self.model, inputs, outputs=self._outputs())
                handles.append(handle.get_result)
            except Exception as err:  # noqa: BLE001 - e.g. connection refused
                handles.append(lambda err=err: _raise(err))
        return [self._image_or_error(get, i) for i, get in enumerate(handles)]

    def _many_grpc(self, requests: list) -> list:
        results: list = [None] * len(requests)
        slots = threading.Semaphore(self.concurrency)
        finished = threading.Semaphore(0)

        def finish(i, result, error):
            results[i] = self._image_or_error(lambda: _raise(error) if error is not None else result, i)
            slots.release()
            finished.release()

        for i, inputs in enumerate(requests):
            slots.acquire()
            try:
                self._client.async_infer(self.model, inputs, lambda result, error, i=i: finish(i, result, error),
                                         outputs=self._outputs(), client_timeout=self.timeout)
            except Exception as err:  # noqa: BLE001
                finish(i, None, err)
        for _ in requests:
            finished.acquire()
        return results

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _raise(err: Exception):
    raise err


def _message(err: Exception) -> str:
    message = getattr(err, "message", None)
    return message() if callable(message) else str(err)


def _check(prompts, seeds, guidance_scale):
    """Shape checks the server cannot make for us; the content is the server's to judge."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of strings (wrap a single prompt in a list)")
    prompts, seeds = list(prompts), list(seeds)
    if not prompts:
        raise ValueError("prompts is empty")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; one seed per prompt")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not -(2**63) <= int(s) <= MAX_SEED:
            raise ValueError(f"seed {i} must be an integer in [0, 2**63 - 1] (an int64), got {s!r}")
    guidance = None
    if guidance_scale is not None:
        guidance = np.broadcast_to(np.asarray(guidance_scale, dtype=np.float32), (len(prompts),)).copy()
    return prompts, seeds, guidance


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parser() -> Parser:
    p = Parser(prog="python -m boot_serve.client", description="Generate images with the boot model served by Triton.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", nargs="+", help="one or more captions")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i gets seed + i")
    p.add_argument("--out", default="img.png",
                   help="output PNG; with several prompts, <stem>-<i>.png")
    p.add_argument("--url", default=None, help="server host:port (default 127.0.0.1:8000 http, :8001 grpc)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="http", help="Triton protocol")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the student's recommended value)")
    p.operator_group("server (operators)").add_argument("--model", default=MODEL, help="model name on the server")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not 0 <= args.seed <= MAX_SEED - len(args.prompts):
        p.error("--seed must be in [0, 2**63 - 1]")

    out = Path(args.out)
    paths = [out] if len(args.prompts) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
                                                  for i in range(len(args.prompts))]
    try:
        with Client(args.url, args.protocol, args.model) as client:
            start = time.perf_counter()
            images = client.generate(args.prompts, [args.seed + i for i in range(len(args.prompts))], args.guidance)
            elapsed = time.perf_counter() - start
    except ServerUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RequestError, ValueError) as err:
        print(f"error: the server rejected the request: {err}", file=sys.stderr)
        return 1
    for path, image, prompt in zip(paths, images, args.prompts):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"{path}  {image.width}x{image.height}  {prompt!r}")
    print(f"{len(images)} image(s) in {elapsed * 1000:.0f} ms from {args.protocol}://{client.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
