"""What the gradio demo (demo/app.py) runs: backend choice, timing and readable errors.

The demo file holds only widgets; everything it calls is here:
  - `load_backend`: the student behind the demo, best first: the Triton server at `--url`
    (through boot_serve.client), else the in-process ONNX Runtime pipeline of `--repository`,
    else the PyTorch reference pipeline of `--student`;
  - `TeacherBackend`: the teacher's own DDIM sampler at k steps (boot.samplers.TeacherSampler,
    PyTorch, in-process) for the side-by-side view, same prompt, seed and guidance;
  - `DemoSession.run`: one click of "Generate" -> images, the latency measured around the
    backend call (time.perf_counter), and a status line; every failure becomes a message for
    the user (`readable_error`), the traceback goes to the server log only.

Every backend has the project's one generator signature:
    backend.generate(prompts, seeds, guidance_scale=None) -> list[PIL.Image]
"""

from __future__ import annotations

import copy
import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

log = logging.getLogger("boot.demo")

# Seeds typed into a browser go through JavaScript numbers: exact only up to 2**53 - 1.
MAX_UI_SEED = 2**53 - 1
MAX_IMAGES = 8
# Used only when neither the repository nor the student folder says what the student accepts;
# the server still rejects what is outside the real range, with a message.
FALLBACK_GUIDANCE = ((1.0, 8.0), 4.0)


class Backend(Protocol):
    label: str  # shown next to the latency: where the images were made
    guidance_range: tuple[float, float]
    guidance_scale: float  # the student's recommended value

    def generate(self, prompts: list[str], seeds: list[int],
                 guidance_scale: float | None = None) -> list[Image.Image]: ...


# --------------------------------------------------------------------------------------------
# Student backends
# --------------------------------------------------------------------------------------------
def guidance_of(repository: str | Path | None = None, student: str | Path | None = None,
                ) -> tuple[tuple[float, float], float] | None:
    """(guidance_range, recommended guidance) from a repository's manifest.json or a student's
    boot.json, whichever exists first; None when neither does."""
    candidates = []
    if repository is not None:
        candidates.append(Path(repository) / "manifest.json")
    if student is not None:
        candidates.append(Path(student) / "boot.json")
    for path in candidates:
        if path.is_file():
            meta = json.loads(path.read_text())
            lo, hi = (float(v) for v in meta["guidance_range"])
            return (lo, hi), float(meta.get("guidance_scale", lo))
    return None


class PipelineBackend:
    """An in-process pipeline (OnnxPipeline or BootPipeline) as a demo backend."""

    def __init__(self, pipe, label: str):
        self.pipe = pipe
        self.label = label
        self.guidance_range = tuple(pipe.guidance_range)
        self.guidance_scale = float(pipe.guidance_scale)

    def generate(self, prompts, seeds, guidance_scale=None):
        return self.pipe(list(prompts), list(seeds), guidance_scale)


class TritonBackend:
    """The `boot_txt2img` model on a Triton server, one boot_serve.client.Client per thread
    (tritonclient's clients are not meant to be shared between threads)."""

    def __init__(self, url: str | None, protocol: str = "http",
                 guidance: tuple[tuple[float, float], float] | None = None, timeout: float = 120.0):
        from boot_serve.client import DEFAULT_URLS

        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.timeout = timeout
        if guidance is None:  # ask the server; a server that is down now is reported at the first request
            guidance = self._served_guidance()
        self.guidance_known = guidance is not None
        self.guidance_range, self.guidance_scale = guidance or FALLBACK_GUIDANCE
        self.label = f"Triton {protocol}://{self.url}"
        self._local = threading.local()

    def _served_guidance(self) -> tuple[tuple[float, float], float] | None:
        from tritonclient.utils import InferenceServerException

        from boot_serve.client import Client, ClientError

        try:
            with Client(self.url, self.protocol, timeout=10.0) as client:
                return client.guidance()
        except (ClientError, InferenceServerException, OSError):
            return None

    def client(self):
        from boot_serve.client import Client

        if getattr(self._local, "client", None) is None:
            self._local.client = Client(self.url, self.protocol, timeout=self.timeout)
        return self._local.client

    def generate(self, prompts, seeds, guidance_scale=None):
        # None: the server applies the student's own default (GUIDANCE_SCALE is optional).
        # Several images go as one request per image, all in flight at once, not as one request of
        # n prompts: on a CPU a batch of n costs about n single images (no batching gain on 2 cores),
        # while separate requests let the ensemble's models work on different images at once (4 images:
        # 141 against 224 ms on 2 shared cores; docs/serving.md).
        if len(prompts) == 1:
            return self.client().generate(list(prompts), list(seeds), guidance_scale)
        return self.client().generate_many(list(prompts), list(seeds), guidance_scale)


def load_backend(url: str | None = None, protocol: str = "http", repository: str | Path | None = None,
                 student: str | Path | None = None) -> Backend:
    """The demo's student: Triton at `url`, else ONNX Runtime on `repository`, else PyTorch on
    `student`. Raises FileNotFoundError with what to run when none of them is usable."""
    if url:
        return TritonBackend(url, protocol, guidance_of(repository, student))
    if repository is not None and (Path(repository) / "manifest.json").is_file():
        from boot_serve.onnx_pipeline import OnnxPipeline

        pipe = OnnxPipeline.from_pretrained(repository)
        return PipelineBackend(pipe, f"ONNX Runtime in-process ({', '.join(pipe.providers)}) on {repository}")
    if student is not None:
        from boot.pipeline import BootPipeline

        return PipelineBackend(BootPipeline.from_pretrained(student), f"PyTorch in-process on {student}")
    where = f" ({repository} has no manifest.json)" if repository is not None else ""
    raise FileNotFoundError(
        f"no student to serve{where}: give --url of a running server (python -m boot_serve.serve), "
        "--repository of an exported model repository (python -m boot_serve.export), or --student")


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------
class TeacherBackend:
    """The teacher's DDIM sampler at k steps (PyTorch, in-process), loaded once; k per call."""

    def __init__(self, folder: str | Path):
        from boot.folders import read_meta
        from boot.samplers import TeacherSampler

        self.folder = Path(folder)
        self.default_steps = int(read_meta(folder).get("num_inference_steps", 50))
        self._base = TeacherSampler(folder, self.default_steps)
        # One sampler run at a time: the DDIM scheduler keeps its timesteps as state, and two
        # PyTorch runs on the same cores only slow each other down.
        self._lock = threading.Lock()

    def generate(self, prompts, seeds, guidance_scale=None, steps: int | None = None):
        steps = int(steps or self.default_steps)
        if not 1 <= steps <= 1000:
            raise ValueError(f"teacher steps must be in [1, 1000], got {steps}")
        sampler = copy.copy(self._base)  # shares the networks; only the step count differs
        sampler.steps, sampler.name = steps, f"teacher-{steps}"
        with self._lock:
            return sampler(list(prompts), list(seeds), guidance_scale)


# --------------------------------------------------------------------------------------------
# One click of "Generate"
# --------------------------------------------------------------------------------------------
def timed(fn, *args, **kwargs):
    """(fn's result, seconds of wall time) measured with time.perf_counter."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def readable_error(err: BaseException) -> str:
    """One line for the user; never a traceback."""
    from boot_serve.client import RequestError, ServerUnavailableError

    if isinstance(err, ServerUnavailableError):
        return f"Server unavailable: {err}"
    if isinstance(err, RequestError):
        return f"The server rejected the request: {err}"
    if isinstance(err, ValueError):
        return f"Invalid input: {err}"
    if isinstance(err, (FileNotFoundError, ConnectionError, TimeoutError)):
        return f"{type(err).__name__}: {err}"
    return f"Generation failed ({type(err).__name__}): {err}. The demo's log has the details."


def random_seed() -> int:
    return secrets.randbelow(2**31)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


@dataclass
class Outcome:
    images: list[Image.Image] = field(default_factory=list)
    teacher_images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    student_seconds: float | None = None
    teacher_seconds: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class DemoSession:
    """The student backend, the optional teacher, and the rules of one request."""

    def __init__(self, backend: Backend, teacher: TeacherBackend | None = None):
        self.backend = backend
        self.teacher = teacher

    @property
    def guidance_range(self) -> tuple[float, float]:
        return self.backend.guidance_range

    @property
    def guidance_scale(self) -> float:
        return self.backend.guidance_scale

    def run(self, prompt: str, seed, n_images, guidance_scale, compare: bool = False,
            teacher_steps: int | None = None) -> Outcome:
        """Images for `prompt` at seeds seed, seed+1, ... (n_images of them), from the student
        and, with `compare`, from the teacher at `teacher_steps` for the same seeds."""
        out = Outcome()
        try:
            seeds = self.seeds(seed, n_images)
            w = None if guidance_scale is None else float(guidance_scale)
        except ValueError as err:
            out.errors.append(readable_error(err))
            return out
        out.seeds = seeds
        prompts = [prompt] * len(seeds)
        try:
            out.images, out.student_seconds = timed(self.backend.generate, prompts, seeds, w)
        except Exception as err:  # noqa: BLE001 - shown to the user, logged with its traceback
            log.exception("student generation failed")
            out.errors.append(readable_error(err))
            return out
        if compare and self.teacher is not None:
            try:
                out.teacher_images, out.teacher_seconds = timed(
                    self.teacher.generate, prompts, seeds, w, steps=teacher_steps)
            except Exception as err:  # noqa: BLE001
                log.exception("teacher generation failed")
                out.errors.append("Teacher: " + readable_error(err))
        return out

    @staticmethod
    def seeds(seed, n_images) -> list[int]:
        n = int(n_images)
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"number of images must be in [1, {MAX_IMAGES}], got {n}")
        if seed is None or (isinstance(seed, float) and not math.isfinite(seed)):
            raise ValueError("the seed must be an integer")
        if float(seed) != int(seed):
            raise ValueError(f"the seed must be an integer, got {seed}")
        s = int(seed)
        if not 0 <= s <= MAX_UI_SEED - n:
            raise ValueError(f"the seed must be in [0, {MAX_UI_SEED - n}], got {s}")
        return [s + i for i in range(n)]

    def status(self, out: Outcome, teacher_steps: int | None = None) -> str:
        """Markdown status line: latency per request, or the errors."""
        lines = []
        if out.student_seconds is not None:
            n = len(out.images)
            lines.append(f"**Student (1 step)** via {self.backend.label}: {n} image{'s' * (n != 1)} in "
                         f"**{_ms(out.student_seconds)}** ({_ms(out.student_seconds / max(n, 1))} per image), "
                         f"seed{'s' * (n != 1)} {_seed_text(out.seeds)}")
        if out.teacher_seconds is not None:
            k = teacher_steps or (self.teacher.default_steps if self.teacher else "?")
            speedup = out.teacher_seconds / out.student_seconds if out.student_seconds else float("nan")
            lines.append(f"**Teacher (DDIM, {k} steps)**, PyTorch in-process: **{_ms(out.teacher_seconds)}**; "
                         f"the student was {speedup:.1f}x faster on this request")
        lines += [f"**Error:** {e}" for e in out.errors]
        return "\n\n".join(lines)


def _seed_text(seeds: list[int]) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}..{seeds[-1]}"
