"""The text-state cache of the Triton Python models: a sibling of boot_serve/triton_model.py, copied
unchanged beside each `1/model.py` (boot_serve.triton_repo.MODEL_FILES) and imported from it
relatively. Like model.py it imports nothing from the project (numpy only).

Where: the one-hop boot_txt2img and the ensemble's text_encoder. A prompt's text-encoder
outputs depend on its token ids alone (text_states; SDXL-family repositories: both tokenizers' ids give
text_states and the pooled text_embeds; the student takes the guidance scale itself, so there are no
unconditional states to keep), so the model keeps them in a least-recently-used table keyed by the exact
ids, and a repeated prompt skips the text encoder (`TextStateCache`). A hit returns the arrays the miss
computed, read-only: bit-identical states, so the image is the one the miss gave. Config parameter
`text_cache_bytes`: the table's bound in bytes per model instance (arrays, keys and a per-entry
allowance), default DEFAULT_TEXT_CACHE_BYTES, 0 turns the cache off. Hits, misses (rows the text encoder
ran), evictions, entries and bytes held are Triton custom metrics on the metrics port
(boot_text_cache_*, labels model, version, instance).
"""

import threading
from collections import OrderedDict

import numpy as np

# Text-state cache bound per model instance: 64 MiB hold about 2,600 prompts of the shapes student
# (16 x 384 fp32 states, 25 KiB with key and allowance), about 280 of an SD-1.5 one (77 x 768), about 100
# of an SDXL one.
DEFAULT_TEXT_CACHE_BYTES = 64 << 20


class TextStateCache:
    """A bounded least-recently-used table of text-encoder outputs keyed by a prompt's exact token ids.

    Each entry holds one prompt's output rows as owned, read-only arrays (a caller cannot change what the
    next hit gets; a row never keeps its whole batch alive). Its size is its arrays, its key and
    ENTRY_OVERHEAD for the table slot and the array headers; the sizes of all entries never exceed
    `max_bytes`: the least recently used entries leave first, and an entry bigger than the bound is not
    kept. One lock guards the table and the counters (execute may run from several threads); the text
    encoder itself runs outside it."""

    ENTRY_OVERHEAD = 1024

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"text_cache_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict = OrderedDict()  # key -> (arrays, size)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes):
        """The arrays stored under `key` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, rows) -> tuple:
        """Store read-only copies of `rows` under `key`; returns what a lookup of `key` gives now (the
        entry already there if another thread stored it first)."""
        arrays = tuple(np.array(r, copy=True) for r in rows)
        for a in arrays:
            a.flags.writeable = False
        size = sum(a.nbytes for a in arrays) + len(key) + self.ENTRY_OVERHEAD
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            if size > self.max_bytes:
                return arrays
            while self.bytes + size > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self.bytes -= old
                self.evictions += 1
            self._entries[key] = (arrays, size)
            self.bytes += size
            return arrays

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes}


def text_cache_bytes(params: dict[str, str]) -> int:
    """The config parameter `text_cache_bytes` (absent: DEFAULT_TEXT_CACHE_BYTES)."""
    raw = params.get("text_cache_bytes", str(DEFAULT_TEXT_CACHE_BYTES)).strip()
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise RuntimeError(f"parameter text_cache_bytes is {raw!r}; it must be a whole number of bytes >= 0 "
                           "(0 turns the text-state cache off)")
    return value


class TextEncoder:
    """The text encoder graph behind a TextStateCache: token ids (B, L) per input -> its outputs (B, ...).

    Rows whose ids are in the cache are not run; the others run as one batch (a prompt twice in the batch
    once) and are stored. Counted per row: a hit is a row the encoder did not run for, a miss one it ran.
    `max_bytes` 0: every batch runs as it comes, nothing is kept or counted."""

    def __init__(self, session, outputs: list[str], max_bytes: int):
        self.session, self.outputs = session, list(outputs)
        self.cache = TextStateCache(max_bytes) if max_bytes > 0 else None

    def __call__(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.cache is None:
            return dict(zip(self.outputs, self.session.run(self.outputs, ids)))
        names = list(ids)
        keys = [b"".join(np.ascontiguousarray(ids[name][i]).tobytes() for name in names)
                for i in range(len(ids[names[0]]))]
        rows = [self.cache.get(key) for key in keys]
        todo: dict[bytes, int] = {}  # key -> its first row, in batch order
        for i, (key, row) in enumerate(zip(keys, rows)):
            if row is None:
                todo.setdefault(key, i)
        if todo:
            first = list(todo.values())
            outputs = self.session.run(self.outputs, {name: v[first] for name, v in ids.items()})
            stored = {key: self.cache.put(key, [o[j] for o in outputs]) for j, key in enumerate(todo)}
            rows = [stored[key] if row is None else row for key, row in zip(keys, rows)]
        self.cache.count(hits=len(keys) - len(todo), misses=len(todo))
        return {name: np.stack([row[k] for row in rows]) for k, name in enumerate(self.outputs)}
