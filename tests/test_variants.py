"""The two CPU repository variants against each other, each served by a real tritonserver.

cpu-onehop serves the whole request in one Python model; cpu-ensemble chains preprocess ->
text_encoder -> boot_unet -> vae_decoder. The default one is conftest's `triton_server`, the other
is served here from a copy of the same export. Checked:
- the same (prompt, seed, guidance) gives byte-identical images from both, alone and batched;
- every bad request gets the same error from both, fails alone among concurrent good ones, and
  each server keeps serving.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from boot_serve import triton_configs, triton_repo
from boot_serve.client import Client, RequestError
from tests.test_serving import BAD_PROMPTS, PROMPTS, SEEDS


@pytest.fixture(scope="module")
def other_server(exported_repository, tmp_path_factory):
    """The exported repository rewritten as the CPU variant that is not the default, served on its own."""
    from boot_serve.triton_server import TritonServer

    other = next(v for v in triton_configs.CPU_VARIANTS if v != triton_configs.DEFAULT_CPU_VARIANT)
    repo = tmp_path_factory.mktemp(other) / "model_repository"
    shutil.copytree(exported_repository, repo)
    triton_repo.write_configs(repo, other)
    server = TritonServer(repo, exit_timeout=5)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clients(triton_server, other_server):
    servers = {triton_repo.served_variant(s.repository): s for s in (triton_server, other_server)}
    assert set(servers) == {"cpu-onehop", "cpu-ensemble"}
    assert triton_repo.served_variant(triton_server.repository) == triton_configs.DEFAULT_CPU_VARIANT
    with Client(servers["cpu-onehop"].grpc_url, "grpc", concurrency=16) as onehop, \
            Client(servers["cpu-ensemble"].grpc_url, "grpc", concurrency=16) as ensemble:
        yield {"cpu-onehop": onehop, "cpu-ensemble": ensemble}


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


@pytest.mark.parametrize("guidance", [None, 1.0, 4.5])
def test_variants_give_byte_identical_images(clients, guidance):
    for prompts, seeds in ((PROMPTS[:1], SEEDS[:1]), (PROMPTS, SEEDS)):  # one request of 1, one of 4
        a, b = (_arrays(c.generate(prompts, seeds, guidance)) for c in clients.values())
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
        assert np.array_equal(a, b), f"{int(np.abs(a.astype(int) - b).max())} levels apart"
    # Not equal for a trivial reason: another seed gives another image.
    other = _arrays(clients["cpu-onehop"].generate(PROMPTS[:1], [SEEDS[0] + 1], guidance))
    assert not np.array_equal(a[:1], other)


BAD = [([prompt], [0], None, message) for prompt, message in BAD_PROMPTS.values()] + [
    (PROMPTS[:1], [-1], None, r"SEED is -1; seeds are integers in \[0, 2\*\*63 - 1\]"),
    (PROMPTS[:1], [0], math.nan, "GUIDANCE_SCALE is nan; it must be a finite number"),
    (PROMPTS[:1], [0], 5.5, r"GUIDANCE_SCALE is 5.5, outside this student's range \[1.0, 5.0\]"),
    (["a red circle", " "], [0, 1], None, r"PROMPT\[1\] is empty"),
]


@pytest.mark.parametrize("variant", ["cpu-onehop", "cpu-ensemble"])
@pytest.mark.parametrize("prompts, seeds, guidance, message", BAD,
                         ids=[*BAD_PROMPTS, "negative_seed", "nan_guidance", "guidance_over", "second_prompt_empty"])
def test_bad_request_same_error_in_both_variants(clients, variant, prompts, seeds, guidance, message):
    client = clients[variant]
    with pytest.raises(RequestError, match=message) as err:
        client.generate(prompts, seeds, guidance)
    assert err.value.status == "StatusCode.INVALID_ARGUMENT"
    good = client.generate(PROMPTS[:1], SEEDS[:1])  # still serving
    assert good[0].size == (16, 16)


@pytest.mark.parametrize("variant", ["cpu-onehop", "cpu-ensemble"])
def test_bad_requests_fail_alone_among_concurrent_good_ones(clients, variant):
    bad = {3: "", 7: "x " * 40, 11: b"\xc3\x28"}
    prompts = [bad.get(i, PROMPTS[i % 4]) for i in range(16)]
    seeds = [-1 if i == 5 else 300 + i for i in range(16)]
    for round_ in range(5):
        guidance = 4.0 if round_ % 2 else None
        results = clients[variant].generate_many(prompts, seeds, guidance, return_errors=True)
        for i, r in enumerate(results):
            assert isinstance(r, RequestError) == (i in bad or i == 5), (round_, i, r)
        alone = clients[variant].generate([prompts[0]], [seeds[0]], guidance)
        assert np.abs(_arrays(results[:1]).astype(int) - _arrays(alone)).max() <= 1  # batched with bad ones
