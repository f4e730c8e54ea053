"""Precomputed text states (shapes_world.text_states precompute + BOOT_TEXT_STATES) stand in for the encoder exactly."""

import pytest
import torch

from boot import text


def test_precomputed_states_equal_the_encoder_and_refuse_unknown_prompts(tmp_path, monkeypatch):
    prompts = ["a red circle", "a blue square left of a green triangle"]
    text.precompute(tmp_path, prompts, torch.float32)
    want = text.encode([*prompts, ""], text.load_tokenizer(), text.load_text_encoder())
    monkeypatch.setenv(text.STATES_ENV, str(tmp_path))
    tokenizer, table = text.load_tokenizer(), text.load_text_encoder()
    assert isinstance(table, text.StatesTable) and tokenizer.model_max_length == text.MAX_LENGTH
    assert torch.equal(text.encode([*prompts, ""], tokenizer, table), want)
    assert torch.equal(text.encode([prompts[1], prompts[0]], tokenizer, table), want[[1, 0]])
    with pytest.raises(KeyError, match="no precomputed text states"):
        text.encode(["a yellow circle"], tokenizer, table)


def test_float16_states_are_the_rounded_encoder_output(tmp_path, monkeypatch):
    text.precompute(tmp_path, ["a white square"])
    want = text.encode(["a white square"], text.load_tokenizer(), text.load_text_encoder())
    monkeypatch.setenv(text.STATES_ENV, str(tmp_path))
    got = text.encode(["a white square"], text.load_tokenizer(), text.load_text_encoder())
    assert got.dtype == torch.float32 and torch.equal(got, want.half().float())
