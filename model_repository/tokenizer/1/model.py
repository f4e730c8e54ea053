"""Triton Python model `tokenizer`: PROMPT (UTF-8 bytes) -> input_ids INT64 [L], per request.

The repository's tokenizer.json (written by `python -m boot_serve.export`, the path is
manifest.json "tokenizer") pads every prompt to L = manifest "max_length" tokens, exactly as
`tokenizer(prompts, padding="max_length", max_length=L)` in the in-process pipelines.

Rejected, each with a per-request error (the other requests of the batch go on):
- bytes that are not UTF-8;
- an empty or whitespace-only prompt;
- a prompt longer than L tokens ([CLS]/[SEP] or BOS/EOS included). The server REJECTS it
  rather than truncating: a truncated prompt silently drops objects or positions from the
  picture, and a client can shorten the prompt itself.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _invalid(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        repository = Path(args["model_repository"]).parent
        manifest = json.loads((repository / "manifest.json").read_text())
        self.max_length = int(manifest["max_length"])
        self.tokenizer = Tokenizer.from_file(str(repository / manifest["tokenizer"] / "tokenizer.json"))
        padding = self.tokenizer.padding or {}
        if padding.get("length") != self.max_length:
            raise pb_utils.TritonModelException(
                f"tokenizer.json pads to {padding.get('length')}, manifest max_length is {self.max_length}: "
                "re-run `python -m boot_serve.export`")
        # Long prompts must show their true length so that they can be rejected.
        self.tokenizer.no_truncation()

    def execute(self, requests):
        return [self._tokenize(request) for request in requests]

    def _tokenize(self, request):
        prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)  # (B,) bytes
        texts = []
        for i, raw in enumerate(prompts):
            where = f"PROMPT[{i}]" if len(prompts) > 1 else "PROMPT"
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError as err:
                return _invalid(f"{where} is not valid UTF-8 ({err.reason} at byte {err.start})")
            if not text.strip():
                return _invalid(f"{where} is empty; send a non-empty caption")
            texts.append(text)
        encodings = self.tokenizer.encode_batch(texts)
        for i, enc in enumerate(encodings):
            if len(enc.ids) > self.max_length:
                where = f"PROMPT[{i}]" if len(prompts) > 1 else "PROMPT"
                return _invalid(f"{where} is {len(enc.ids)} tokens long (special tokens included); this model "
                                f"accepts at most {self.max_length}. Over-long prompts are rejected, not truncated")
        ids = np.array([enc.ids for enc in encodings], dtype=np.int64)  # (B, L)
        return pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", ids)])
