"""Triton Python model `preprocess`: checks a request, tokenizes its prompts, draws its noise.

    PROMPT BYTES [1], SEED INT64 [1], GUIDANCE_SCALE FP32 [1] (optional)
        -> input_ids INT64 [L], noise FP32 [C, h, w], guidance_scale FP32 [1]
           (+ input_ids_2 INT64 [L] for SDXL-family students: manifest "tokenizer_2")

The first and only step of the `boot_txt2img` ensemble that can reject a request; every later
step depends on its outputs. (Tokenizer and noise used to be two parallel ensemble steps:
when one of them failed a request while the other still had it, Triton 2.51 sometimes left
the request hanging forever or let the other step read its freed input. Nothing runs beside
the failing step now.)

1. prompt -> input_ids with the repository's tokenizer.json (written by `boot_serve.export`,
   path in manifest.json "tokenizer"), padded to L = manifest "max_length" exactly as
   `tokenizer(prompts, padding="max_length", max_length=L)` in the in-process pipelines; an SDXL-family
   repository's second tokenizer (its own padding token) gives input_ids_2 the same way.
2. seed -> noise, the noise contract of docs/interfaces.md:
       numpy.random.default_rng(seed).standard_normal((C, h, w), dtype=float32) * init_noise_sigma
   so an image depends only on (prompt, seed, guidance), never on its batch.
3. GUIDANCE_SCALE absent -> the student's recommended scale (manifest "guidance_scale").

Rejected with a per-request error (INVALID_ARG; the other requests of the batch go on):
a prompt over MAX_PROMPT_BYTES (checked before any decoding, so a megabyte prompt costs
nothing to refuse); bytes that are not UTF-8; an empty or whitespace-only prompt; a prompt longer than L tokens
(special tokens included; REJECTED, not truncated: truncation silently drops objects or
positions from the picture); a negative seed (INT64 cannot exceed 2**63 - 1); a NaN/Inf
guidance or one outside manifest "guidance_range".
"""

import json
import math
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# Far above any prompt that fits the token limit (16-77 tokens are a few hundred bytes), far
# below what would make tokenizing a rejected prompt cost more than serving a good one.
MAX_PROMPT_BYTES = 4096


class RequestRejected(ValueError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        repository = Path(args["model_repository"]).parent
        manifest = json.loads((repository / "manifest.json").read_text())
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
                raise pb_utils.TritonModelException(
                    f"{manifest[key]}/tokenizer.json pads to {padding.get('length')}, manifest max_length is "
                    f"{self.max_length}: re-run `python -m boot_serve.export`")
            tokenizer.no_truncation()  # an over-long prompt must show its true length to be rejected
            self.tokenizers[output] = tokenizer

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self._preprocess(request)
            except RequestRejected as err:
                error = pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]))
        return responses

    def _preprocess(self, request) -> dict:
        prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)  # (B,) bytes
        seeds = pb_utils.get_input_tensor_by_name(request, "SEED").as_numpy().reshape(-1)  # (B,)
        guidance = pb_utils.get_input_tensor_by_name(request, "GUIDANCE_SCALE")
        scales = (np.full(seeds.shape, self.default_guidance, dtype=np.float32) if guidance is None
                  else guidance.as_numpy().reshape(-1).astype(np.float32))
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
        return {**ids, "noise": noise.astype(np.float32, copy=False), "guidance_scale": scales.reshape(-1, 1)}

    def _ids(self, raw, at: str) -> dict:
        text = self._decode(raw, at)
        return {name: self._tokenize(tok, text, at) for name, tok in self.tokenizers.items()}

    def _decode(self, raw, at: str) -> str:
        size = len(raw) if isinstance(raw, bytes) else len(str(raw).encode())
        if size > MAX_PROMPT_BYTES:
            raise RequestRejected(f"PROMPT{at} is {size} bytes; at most {MAX_PROMPT_BYTES} bytes are accepted "
                                  f"(and at most {self.max_length} tokens)")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as err:
            raise RequestRejected(f"PROMPT{at} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if not text.strip():
            raise RequestRejected(f"PROMPT{at} is empty; send a non-empty caption")
        return text

    def _tokenize(self, tokenizer, text: str, at: str) -> np.ndarray:
        ids = tokenizer.encode(text).ids
        if len(ids) > self.max_length:
            raise RequestRejected(f"PROMPT{at} is {len(ids)} tokens long (special tokens included); this model "
                                  f"accepts at most {self.max_length}. Over-long prompts are rejected, not truncated")
        return np.asarray(ids, dtype=np.int64)


def _at(i: int, n: int) -> str:
    """Which element of a multi-prompt request, for the error message."""
    return f"[{i}]" if n > 1 else ""
