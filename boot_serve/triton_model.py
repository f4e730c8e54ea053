"""The Triton Python models of boot: one source for every Python-backend model of the repository.

`python -m boot_serve.triton_repo` copies this file, unchanged, to `<model>/1/model.py` of each
Python-backend model; what a copy does follows from its model's name:

    preprocess     PROMPT, SEED, GUIDANCE_SCALE -> input_ids [L], noise [C, h, w], guidance_scale [1]
                   (first step of the ensemble: checks the request, tokenizes, draws the noise;
                   SDXL-family repositories, manifest "tokenizer_2": also input_ids_2 [L])
    text_encoder,  one ONNX graph of the repository in ONNX Runtime: tensor names and dims come
    boot_unet,     from config.pbtxt (identical to the graph's, docs/interfaces.md), per-request
    vae_decoder    dims from `reshape` where the config has one
    boot_txt2img   (cpu-onehop variant) the whole request in this one model: the checks, tokenizer
                   and noise of `preprocess`, then the three graphs one after the other:
                   PROMPT, SEED, GUIDANCE_SCALE -> IMAGE [H, W, 3]

The file and its sibling need numpy, tokenizers and onnxruntime, not boot_serve (NVIDIA's Triton
container runs them with nothing else installed); the sibling is imported relatively, which resolves
to `1.triton_text_cache` where Triton imports this file as `1.model` (its version folder as a
package) and to boot_serve.triton_text_cache in the project. Without `triton_python_backend_utils`
it still imports, so that the request handling below can be run and tested in-process.

Request handling (docs/interfaces.md):
1. prompt -> input_ids with the repository's tokenizer.json (written by `boot_serve.export`, path in
   manifest.json "tokenizer"), padded to L = manifest "max_length" exactly as
   `tokenizer(prompts, padding="max_length", max_length=L)` in the in-process pipelines; an SDXL-family
   repository's second tokenizer (manifest "tokenizer_2", its own padding token) gives input_ids_2 alike.
2. seed -> noise, the noise contract:
       numpy.random.default_rng(seed).standard_normal((C, h, w), dtype=float32) * init_noise_sigma
   so an image depends only on (prompt, seed, guidance), never on its batch.
3. GUIDANCE_SCALE absent -> the student's recommended scale (manifest "guidance_scale").

Rejected with a per-request error (INVALID_ARG; the other requests of the batch go on): a prompt over
MAX_PROMPT_BYTES (checked before any decoding, so a megabyte prompt costs nothing to refuse); bytes
that are not UTF-8; a prompt with no content, answered as the empty prompt is (`PROMPT is empty`): empty,
or made only of characters nobody sees (whitespace, NUL and other controls, zero-width and format
characters, combining marks alone, blank fillers: `has_content`), or one the tokenizer reads as the
empty prompt (special tokens only; an SDXL-family repository's first tokenizer decides); a prompt longer
than L tokens (special tokens included; REJECTED, not truncated: truncation silently drops objects or
positions from the picture);
a negative seed (INT64 cannot exceed 2**63 - 1); a NaN/Inf guidance or one outside manifest
"guidance_range".

Graph runs: one run per execute over the whole dynamic batch, the requests' tensors stacked along
the batch axis and the outputs split back. A failing run fails each request of the batch with the
error, and the model keeps serving. ONNX Runtime settings are the config parameters `providers`
(comma-separated, default CPUExecutionProvider), `intra_op_thread_count` (0: ORT's default, one
thread per physical core) and `allow_spinning` (default "0": spinning worker threads burn the
cores that the next request or the server's other models need).

Text-state cache (the one-hop boot_txt2img and the ensemble's text_encoder): a repeated prompt skips
the text encoder (`TextEncoder`, `TextStateCache`, config parameter `text_cache_bytes`: the sibling
module triton_text_cache.py, copied beside this file). Its hits, misses, evictions, entries and bytes
held are Triton custom metrics on the metrics port (boot_text_cache_*, labels model, version,
instance: `CacheMetrics` below).
"""

import json
import math
import unicodedata
from pathlib import Path

import numpy as np

from .triton_text_cache import TextEncoder, TextStateCache, text_cache_bytes

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside a Triton stub (tests, tools)
    pb_utils = None

# Far above any prompt that fits the token limit (16-77 tokens are a few hundred bytes), far
# below what would make tokenizing a rejected prompt cost more than serving a good one.
MAX_PROMPT_BYTES = 4096
GRAPHS = ("text_encoder", "boot_unet", "vae_decoder")

# boot.contract's prompt-content rule, copied (this file imports no project package);
# tests/test_prompt_content.py holds each copy equal to its original.
# Copied from boot.contract.NO_CONTENT_CATEGORIES
NO_CONTENT_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zs", "Zl", "Zp", "Mn", "Me"})
# Copied from boot.contract.NO_CONTENT_CHARACTERS
NO_CONTENT_CHARACTERS = frozenset({
    0x115F, 0x1160, 0x3164, 0xFFA0,  # Hangul fillers (Lo): blank by design
    0x2800,  # BRAILLE PATTERN BLANK (So)
    0x1D159,  # MUSICAL SYMBOL NULL NOTEHEAD (So): no glyph
    0x2065, *range(0xFFF0, 0xFFF9),  # reserved default-ignorable (Cn): only invisible characters ever go here
    *range(0xFDD0, 0xFDF0),  # noncharacters (Cn); the U+xFFFE/U+xFFFF of every plane are tested in has_content
})


# Copied from boot.contract.has_content
def has_content(text: str) -> bool:
    """Whether `text` has a character that can be seen: one outside NO_CONTENT_CATEGORIES and
    NO_CONTENT_CHARACTERS, not whitespace, not a noncharacter, not in the tag / variation selector
    block U+E0000-U+E0FFF (format characters or reserved default-ignorable)."""
    for ch in text:
        cp = ord(ch)
        if not (ch.isspace() or unicodedata.category(ch) in NO_CONTENT_CATEGORIES or cp in NO_CONTENT_CHARACTERS
                or cp & 0xFFFE == 0xFFFE or 0xE0000 <= cp <= 0xE0FFF):
            return True
    return False


class RequestRejected(ValueError):
    """A request outside the client contract: answered with its own INVALID_ARG error."""


# --------------------------------------------------------------------------------------------
# Request -> graph inputs
# --------------------------------------------------------------------------------------------
class Preprocessor:
    """Checks one request and turns it into input_ids (B, L) (and input_ids_2 (B, L) for SDXL-family
    repositories), noise (B, C, h, w), guidance (B,)."""

    def __init__(self, repository: Path, manifest: dict):
        from tokenizers import Tokenizer

        self.max_length = int(manifest["max_length"])
        self.latent_shape = tuple(int(v) for v in manifest["latent_shape"])
        self.init_noise_sigma = np.float32(manifest["init_noise_sigma"])
        self.low, self.high = (float(v) for v in manifest["guidance_range"])
        self.default_guidance = float(manifest["guidance_scale"])
        self.tokenizers = {}  # output name -> tokenizer
        for key, output in (("tokenizer", "input_ids"), ("tokenizer_2", "input_ids_2")):
            if key not in manifest:
                continue
            tokenizer = Tokenizer.from_file(str(repository / manifest[key] / "tokenizer.json"))
            padding = tokenizer.padding or {}
            if padding.get("length") != self.max_length:
                raise RuntimeError(f"{manifest[key]}/tokenizer.json pads to {padding.get('length')}, manifest "
                                   f"max_length is {self.max_length}: re-run `python -m boot_serve.export`")
            tokenizer.no_truncation()  # an over-long prompt must show its true length to be rejected
            self.tokenizers[output] = tokenizer
        # The empty prompt's padded ids: a prompt the first tokenizer gives these is refused as empty. The
        # first decides for SDXL-family repositories too, as in the in-process pipelines: one rule for
        # every family (SDXL's two tokenizers are both CLIP's and differ in their padding token only).
        self.empty_ids = self.tokenizers["input_ids"].encode("").ids

    def __call__(self, prompts, seeds, scales=None) -> dict[str, np.ndarray]:
        """prompts (B,) bytes or str, seeds (B,) int64, scales (B,) float32 or None."""
        prompts, seeds = np.asarray(prompts, dtype=object).reshape(-1), np.asarray(seeds).reshape(-1)
        scales = (np.full(seeds.shape, self.default_guidance, dtype=np.float32) if scales is None
                  else np.asarray(scales).reshape(-1).astype(np.float32))
        rows = [self._ids(p, _at(i, len(prompts))) for i, p in enumerate(prompts)]
        ids = {name: np.stack([row[name] for row in rows]) for name in self.tokenizers}  # (B, L) each
        for i, (seed, w) in enumerate(zip(seeds.tolist(), scales.tolist())):
            at = _at(i, len(seeds))
            if seed < 0:
                raise RequestRejected(f"SEED{at} is {seed}; seeds are integers in [0, 2**63 - 1]")
            if not math.isfinite(w):
                raise RequestRejected(f"GUIDANCE_SCALE{at} is {w}; it must be a finite number")
            if not self.low <= w <= self.high:
                raise RequestRejected(f"GUIDANCE_SCALE{at} is {w}, outside this student's range "
                                      f"[{self.low}, {self.high}]")
        noise = np.stack([np.random.default_rng(s).standard_normal(self.latent_shape, dtype=np.float32)
                          for s in seeds.tolist()]) * self.init_noise_sigma  # (B, C, h, w)
        return {**ids, "noise": noise.astype(np.float32, copy=False), "guidance_scale": scales}

    def _ids(self, raw, at: str) -> dict[str, np.ndarray]:
        text = self._decode(raw, at)
        # input_ids first: the empty check comes before any token-length check
        return {name: self._tokenize(name, tokenizer, text, at) for name, tokenizer in self.tokenizers.items()}

    def _decode(self, raw, at: str) -> str:
        size = len(raw) if isinstance(raw, bytes) else len(str(raw).encode())
        if size > MAX_PROMPT_BYTES:
            raise RequestRejected(f"PROMPT{at} is {size} bytes; at most {MAX_PROMPT_BYTES} bytes are accepted "
                                  f"(and at most {self.max_length} tokens)")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as err:
            raise RequestRejected(f"PROMPT{at} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if not has_content(text):
            raise _empty(at)
        return text

    def _tokenize(self, name: str, tokenizer, text: str, at: str) -> np.ndarray:
        ids = tokenizer.encode(text).ids
        if name == "input_ids" and ids == self.empty_ids:  # what has_content misses for this tokenizer
            raise _empty(at)
        if len(ids) > self.max_length:
            raise RequestRejected(f"PROMPT{at} is {len(ids)} tokens long (special tokens included); this model "
                                  f"accepts at most {self.max_length}. Over-long prompts are rejected, not truncated")
        return np.asarray(ids, dtype=np.int64)


def _empty(at: str) -> RequestRejected:
    """The one answer to every prompt without content, the empty prompt's."""
    return RequestRejected(f"PROMPT{at} is empty; send a non-empty caption")


def _at(i: int, n: int) -> str:
    """Which element of a multi-prompt request, for the error message."""
    return f"[{i}]" if n > 1 else ""


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------
def session(path: Path, params: dict[str, str]):
    """An ONNX Runtime session with the config's settings (module docstring)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
    options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
    providers = [p.strip() for p in params.get("providers", "CPUExecutionProvider").split(",") if p.strip()]
    return ort.InferenceSession(str(path), options, providers=providers)


def split(outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Batch outputs back into one dict per request of `sizes` rows each."""
    parts, start = [], 0
    for size in sizes:
        parts.append({k: np.ascontiguousarray(v[start:start + size]) for k, v in outputs.items()})
        start += size
    return parts


class OneHop:
    """The whole request in one process: Preprocessor, then text encoder -> UNet -> VAE decoder."""

    def __init__(self, repository: Path, params: dict[str, str]):
        manifest = json.loads((repository / "manifest.json").read_text())
        self.preprocess = Preprocessor(repository, manifest)
        self.sessions = {g: session(repository / manifest["graphs"][g]["path"], params) for g in GRAPHS}
        outputs = ["text_states", "text_embeds"] if "tokenizer_2" in manifest else ["text_states"]
        self.text_encoder = TextEncoder(self.sessions["text_encoder"], outputs, text_cache_bytes(params))

    def __call__(self, requests: list[tuple]) -> list[np.ndarray | Exception]:
        """(prompts, seeds, scales or None) per request -> its images (B, H, W, 3) uint8, or the
        RequestRejected / RuntimeError that answers it."""
        results: list = [None] * len(requests)
        good, feeds = [], []
        for i, request in enumerate(requests):
            try:
                feeds.append(self.preprocess(*request))
                good.append(i)
            except RequestRejected as err:
                results[i] = err
        if not good:
            return results
        batch = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        try:
            images = self.run(batch)
        except Exception as err:  # noqa: BLE001 - reported to every request of the batch
            failure = RuntimeError(f"boot_txt2img: ONNX Runtime failed on a batch of {len(batch['noise'])}: {err}")
            for i in good:
                results[i] = failure
            return results
        for i, part in zip(good, split({"image": images}, [len(f["noise"]) for f in feeds])):
            results[i] = part["image"]
        return results

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """input_ids (and input_ids_2), noise, guidance_scale (B,) -> (B, H, W, 3) uint8: the ensemble's
        three graphs (SDXL family: the text encoder also gives text_embeds, which the UNet takes)."""
        encoded = self.text_encoder({k: batch[k] for k in ("input_ids", "input_ids_2") if k in batch})
        (latents,) = self.sessions["boot_unet"].run(["latents"], {
            "noise": batch["noise"], "guidance_scale": batch["guidance_scale"], **encoded})
        (image,) = self.sessions["vae_decoder"].run(["image"], {"latents": latents})
        return image


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------
def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _error(err: Exception):
    code = pb_utils.TritonError.INVALID_ARG if isinstance(err, RequestRejected) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))


class CacheMetrics:
    """A TextStateCache's counters as Triton custom metrics (Prometheus, on the server's metrics port):
    boot_text_cache_{hits,misses,evictions} counters, boot_text_cache_{entries,bytes} gauges, labelled
    with the model, its version and the instance (each instance is its own process with its own cache).
    `update()` after each execute sends what changed since the last one."""

    COUNTERS = {"hits": "Prompts whose text-encoder states came from the text-state cache",
                "misses": "Prompts the text encoder ran for (not in the text-state cache)",
                "evictions": "Entries the text-state cache dropped to stay within its byte bound"}
    GAUGES = {"entries": "Prompts held in the text-state cache",
              "bytes": "Bytes the text-state cache holds (bounded by the config parameter text_cache_bytes)"}

    def __init__(self, cache: TextStateCache, labels: dict[str, str]):
        self.cache = cache
        self.families, self.metrics = [], {}
        for names, kind in ((self.COUNTERS, pb_utils.MetricFamily.COUNTER), (self.GAUGES, pb_utils.MetricFamily.GAUGE)):
            for key, description in names.items():
                family = pb_utils.MetricFamily(name=f"boot_text_cache_{key}", description=description, kind=kind)
                self.families.append(family)
                self.metrics[key] = family.Metric(labels=labels)
        self.sent = dict.fromkeys(self.metrics, 0)

    def update(self) -> None:
        now = self.cache.stats()
        for key, metric in self.metrics.items():
            if now[key] == self.sent[key]:
                continue
            if key in self.COUNTERS:
                metric.increment(float(now[key] - self.sent[key]))
            else:
                metric.set(float(now[key]))
            self.sent[key] = now[key]

    def close(self) -> None:
        """Each Metric before its MetricFamily (Triton's rule for deleting them)."""
        self.metrics.clear()
        self.families.clear()


class TritonPythonModel:
    """What this copy of the file serves follows from its model's name (module docstring)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        repository = Path(args["model_repository"]).parent
        self.encoder = self.metrics = None
        try:
            if self.name == "boot_txt2img":
                self.onehop = OneHop(repository, params)
                self.encoder = self.onehop.text_encoder
            elif self.name == "preprocess":
                self.preprocess = Preprocessor(repository, json.loads((repository / "manifest.json").read_text()))
            else:
                self._init_graph(config, params, Path(args["model_repository"]) / args["model_version"])
        except RuntimeError as err:
            raise pb_utils.TritonModelException(f"{self.name}: {err}") from err
        if self.encoder is not None and self.encoder.cache is not None and hasattr(pb_utils, "MetricFamily"):
            self.metrics = CacheMetrics(self.encoder.cache, {
                "model": self.name, "version": str(args["model_version"]),
                "instance": str(args.get("model_instance_name", ""))})

    def _init_graph(self, config: dict, params: dict[str, str], version: Path) -> None:
        # Per-request dims as the graph sees them: `reshape` where the config has one.
        self.inputs = [(t["name"], [int(d) for d in (t["reshape"].get("shape", []) if "reshape" in t else t["dims"])])
                       for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.session = session(version / params.get("onnx_file", "model.onnx"), params)
        if self.name == "text_encoder":
            self.encoder = TextEncoder(self.session, self.outputs, text_cache_bytes(params))

    def execute(self, requests):
        if self.name == "boot_txt2img":
            responses = self._execute_onehop(requests)
        elif self.name == "preprocess":
            responses = self._execute_preprocess(requests)
        else:
            responses = self._execute_graph(requests)
        if self.metrics is not None:
            self.metrics.update()
        return responses

    def finalize(self):
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _execute_onehop(self, requests):
        results = self.onehop([(_input(r, "PROMPT"), _input(r, "SEED"), _input(r, "GUIDANCE_SCALE"))
                               for r in requests])
        return [_error(x) if isinstance(x, Exception) else pb_utils.InferenceResponse([pb_utils.Tensor("IMAGE", x)])
                for x in results]

    def _execute_preprocess(self, requests):
        responses = []
        for request in requests:
            try:
                out = self.preprocess(_input(request, "PROMPT"), _input(request, "SEED"),
                                      _input(request, "GUIDANCE_SCALE"))
            except RequestRejected as err:
                responses.append(_error(err))
                continue
            out["guidance_scale"] = out["guidance_scale"].reshape(-1, 1)  # GUIDANCE_SCALE dims [1] per request
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses

    def _execute_graph(self, requests):
        sizes, feeds = [], {}
        for name, dims in self.inputs:
            parts = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            feeds[name] = np.concatenate([p.reshape(p.shape[0], *dims) for p in parts])  # (sum B, *dims)
            sizes = [p.shape[0] for p in parts]
        try:
            if self.encoder is not None:
                encoded = self.encoder(feeds)
                outputs = [encoded[name] for name in self.outputs]
            else:
                outputs = self.session.run(self.outputs, feeds)
        except Exception as err:  # noqa: BLE001 - reported to every request of the batch
            error = pb_utils.TritonError(f"{self.name}: ONNX Runtime failed on a batch of {sum(sizes)}: {err}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in part.items()])
                for part in split(dict(zip(self.outputs, outputs)), sizes)]
