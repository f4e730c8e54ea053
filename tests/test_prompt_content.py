"""Prompts without content are refused like the empty prompt, in every pipeline alike.

Two layers (boot.contract): the character rule `has_content` (no tokenizer needed), and, where a
tokenizer is at hand, a prompt that the (first) tokenizer gives the empty prompt's ids. Checked:
- the character rule on prompts with and without content; the code points it lists are what its
  comments say they are;
- boot_serve/triton_model.py's copy of the rule ("# Copied from boot.contract.<name>") is the
  original, by source and on every code point;
- BootPipeline, OnnxPipeline and the Triton request handling (in-process) answer each prompt
  without content exactly as they answer "", and still serve prompts with content in them;
- the token layer catches what the character rule lets through for MiniLM's tokenizer (U+FFFD);
  in SDXL-family repositories the first tokenizer decides.
The served model's answers are in test_serving.py (`test_bad_prompt`).
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from pathlib import Path

import pytest

from boot import contract
from boot_serve import triton_model

ROOT = Path(__file__).resolve().parents[1]

NO_CONTENT = {  # id -> prompt that says nothing
    "nul": "\x00\x00\x00",
    "zero_width_space": "\u200b\u200b",
    "bom": "\ufeff",
    "soft_hyphen": "\u00ad",
    "combining_acute_alone": "\u0301",
    "hangul_filler": "\u3164",
    "hangul_fillers_other": "\u115f\u1160\uffa0",
    "whitespace": " \t\n",
    "ideographic_space": "\u3000",
    "braille_blank": "\u2800",
    "word_joiner_and_zwnj_zwj": "\u2060\u200c\u200d",
    "direction_marks": "\u200e\u200f\u202e",
    "line_paragraph_separators": "\u2028\u2029",
    "variation_selector": "\ufe0f",
    "tag_characters": "\U000e0041\U000e007f",
    "private_use": "\ue000",
    "noncharacter": "\ufffe\U0010ffff",
    "null_notehead": "\U0001d159",
    "mixed": " \u200b\x00\u0301\u3164\u2800\ufeff ",
}
CONTENT = {  # id -> prompt with something to read in it
    "caption": "a red circle",
    "one_letter": "x",
    "kanji": "円",
    "emoji": "🙂",
    "zero_width_inside": "a\u200bred circle",
    "cyrillic": "красный круг",
    "arabic": "دائرة حمراء",
    "devanagari": "लाल वृत्त",
    "letter_and_combining_mark": "e\u0301",
    "spacing_accent": "\u00b4",  # NFKC would make it a space + a combining mark (boot.contract: no NFKC)
    "unassigned": "\u0378",  # Cn counts as content (boot.contract)
    "replacement_character": "\ufffd",  # visible to the character rule; MiniLM's tokenizer drops it
}
READS_AS_EMPTY = "\ufffd"  # content for has_content, the empty prompt's ids for MiniLM's tokenizer


# --------------------------------------------------------------------------------------------
# The character rule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", NO_CONTENT.values(), ids=list(NO_CONTENT))
def test_prompts_without_content(prompt):
    assert not contract.has_content(prompt)
    assert not contract.has_content(prompt * 50)


@pytest.mark.parametrize("prompt", CONTENT.values(), ids=list(CONTENT))
def test_prompts_with_content(prompt):
    assert contract.has_content(prompt)
    assert contract.has_content(NO_CONTENT["mixed"] + prompt + NO_CONTENT["mixed"])


def test_empty_prompt_has_no_content():
    assert not contract.has_content("")


def test_listed_code_points_are_what_the_comments_say():
    """Each listed code point is needed (its category does not already drop it) and is the character
    the comments name (or reserved: no name)."""
    names = {0x115F: "HANGUL CHOSEONG FILLER", 0x1160: "HANGUL JUNGSEONG FILLER", 0x3164: "HANGUL FILLER",
             0xFFA0: "HALFWIDTH HANGUL FILLER", 0x2800: "BRAILLE PATTERN BLANK",
             0x1D159: "MUSICAL SYMBOL NULL NOTEHEAD"}
    for cp in contract.NO_CONTENT_CHARACTERS:
        ch = chr(cp)
        assert unicodedata.category(ch) not in contract.NO_CONTENT_CATEGORIES and not ch.isspace(), hex(cp)
        assert unicodedata.name(ch, None) == names.get(cp), hex(cp)
    reserved = {cp for cp in contract.NO_CONTENT_CHARACTERS if cp not in names}
    assert {unicodedata.category(chr(cp)) for cp in reserved} == {"Cn"}


def test_unassigned_code_points_count_as_content_but_noncharacters_do_not():
    unassigned = [cp for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cn"]
    refused = [cp for cp in unassigned if not contract.has_content(chr(cp))]
    noncharacters = {cp for cp in range(0x110000) if cp & 0xFFFE == 0xFFFE or 0xFDD0 <= cp <= 0xFDEF}
    assert noncharacters <= set(refused)
    assert all(cp in noncharacters or 0xE0000 <= cp <= 0xE0FFF or cp in contract.NO_CONTENT_CHARACTERS
               for cp in refused)
    assert len(refused) < len(unassigned) / 10


# --------------------------------------------------------------------------------------------
# The copy in triton_model.py
# --------------------------------------------------------------------------------------------
MARKER = re.compile(r"^# Copied from boot\.contract\.(\w+)$")


def _definitions(source: str) -> dict[str, str]:
    """Name -> source text of each top-level def, class or assignment of `source`."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(source, node)
    return found


def copy_differences(copy_source: str, original_source: str) -> tuple[set[str], list[str]]:
    """(names marked "# Copied from boot.contract.<name>" in `copy_source`, those whose marked
    definition, the one starting on the line after the marker, differs from the original's)."""
    lines = copy_source.splitlines()
    originals, copies = _definitions(original_source), _definitions(copy_source)
    marked, differ = set(), []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        name = match.group(1)
        marked.add(name)
        follows = i + 1 < len(lines) and (lines[i + 1].startswith((f"def {name}(", f"class {name}", f"{name} =")))
        if not follows or copies.get(name) != originals.get(name):
            differ.append(name)
    return marked, differ


def test_triton_model_copies_of_the_rule_equal_the_originals():
    marked, differ = copy_differences(Path(triton_model.__file__).read_text(), Path(contract.__file__).read_text())
    assert marked == {"NO_CONTENT_CATEGORIES", "NO_CONTENT_CHARACTERS", "has_content"}
    assert differ == []
    # And by behaviour, on every code point (surrogates included: a str may hold them).
    assert [cp for cp in range(0x110000)
            if contract.has_content(chr(cp)) != triton_model.has_content(chr(cp))] == []


def test_the_copy_checker_finds_a_difference():
    original = "A = 1\n\n\ndef f(x):\n    return x\n"
    assert copy_differences("# Copied from boot.contract.f\ndef f(x):\n    return x\n", original) == ({"f"}, [])
    assert copy_differences("# Copied from boot.contract.f\ndef f(x):\n    return 2 * x\n", original)[1] == ["f"]
    assert copy_differences("# Copied from boot.contract.A\nA = 2\n", original)[1] == ["A"]
    assert copy_differences("# Copied from boot.contract.A\n\nB = 1\n", original)[1] == ["A"]  # not under it


# --------------------------------------------------------------------------------------------
# The in-process pipelines
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipelines(served_student, exported_repository):
    from boot.pipeline import BootPipeline
    from boot_serve.onnx_pipeline import OnnxPipeline

    return {"torch": BootPipeline.from_pretrained(served_student),
            "onnx": OnnxPipeline.from_pretrained(exported_repository, providers=["CPUExecutionProvider"])}


def _refusal(pipe, prompts, seeds=None) -> str:
    with pytest.raises(ValueError) as err:
        pipe(prompts, [0] * len(prompts) if seeds is None else seeds)
    return str(err.value)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_pipelines_refuse_prompts_without_content_as_empty(pipelines, kind):
    pipe = pipelines[kind]
    assert _refusal(pipe, [""]) == "prompt 0 must be a non-empty string, got ''"
    assert contract.has_content(READS_AS_EMPTY)  # refused below by the token layer alone
    for prompt in [*NO_CONTENT.values(), READS_AS_EMPTY]:
        assert _refusal(pipe, [prompt]) == f"prompt 0 must be a non-empty string, got {prompt!r}"
        assert _refusal(pipe, ["a red circle", prompt]) == f"prompt 1 must be a non-empty string, got {prompt!r}"
        # Refused where "" is refused: before the seeds are looked at.
        assert _refusal(pipe, [prompt], [-1]) == f"prompt 0 must be a non-empty string, got {prompt!r}"


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_pipelines_serve_prompts_with_content(pipelines, kind):
    prompts = [p for p in CONTENT.values() if p != READS_AS_EMPTY]
    images = pipelines[kind](prompts, list(range(len(prompts))))
    assert len(images) == len(prompts) and images[0].size == (16, 16)


# --------------------------------------------------------------------------------------------
# The Triton request handling, in-process
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(exported_repository) -> dict:
    return json.loads((exported_repository / "manifest.json").read_text())


@pytest.fixture(scope="module")
def preprocess(exported_repository, manifest):
    return triton_model.Preprocessor(exported_repository, manifest)


def _rejected(preprocess, prompts, seeds=None) -> str:
    with pytest.raises(triton_model.RequestRejected) as err:
        preprocess(prompts, [0] * len(prompts) if seeds is None else seeds)
    return str(err.value)


@pytest.mark.parametrize("prompt", [*NO_CONTENT.values(), READS_AS_EMPTY],
                         ids=[*NO_CONTENT, "reads_as_empty"])
def test_triton_model_refuses_prompts_without_content_as_empty(preprocess, prompt):
    empty = _rejected(preprocess, [b""])
    assert empty == "PROMPT is empty; send a non-empty caption"
    assert _rejected(preprocess, [prompt.encode()]) == empty
    assert _rejected(preprocess, [prompt]) == empty  # str, as the in-process tools pass it
    assert _rejected(preprocess, [b"a red circle", prompt.encode()], [0, -1]) == \
        "PROMPT[1] is empty; send a non-empty caption"  # before the seeds, as for ""


def test_triton_model_serves_prompts_with_content(preprocess):
    prompts = [p.encode() for p in CONTENT.values() if p != READS_AS_EMPTY]
    out = preprocess(prompts, list(range(len(prompts))))
    assert out["input_ids"].shape == (len(prompts), preprocess.max_length)
    assert (out["input_ids"] != preprocess.empty_ids).any(axis=1).all()


def test_triton_model_keeps_the_order_of_its_checks(preprocess):
    """Size before decoding, UTF-8 before content, content before token length."""
    assert _rejected(preprocess, ["\u200b" * 2000]).startswith("PROMPT is 6000 bytes; at most 4096 bytes")
    assert _rejected(preprocess, [b"\x00\xff\x00"]).startswith("PROMPT is not valid UTF-8")
    assert _rejected(preprocess, ["\u200b" * 1000]) == "PROMPT is empty; send a non-empty caption"  # 1000 chars
    assert _rejected(preprocess, [READS_AS_EMPTY * 1000]) == "PROMPT is empty; send a non-empty caption"
    assert "tokens long" in _rejected(preprocess, ["a red circle " * 10])


def _tokenizer_seeing(folder: Path, source: Path, replacement_is_content: bool) -> str:
    """A copy of `source`'s tokenizer.json in `folder`; with `replacement_is_content` its normalizer keeps
    U+FFFD (BERT's clean_text drops it), so that "\ufffd" tokenizes to [UNK], not to the empty prompt's ids."""
    folder.mkdir(parents=True)
    data = json.loads((source / "tokenizer.json").read_text())
    if replacement_is_content:
        assert data["normalizer"]["clean_text"] is True
        data["normalizer"]["clean_text"] = False
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder.name


def test_first_tokenizer_decides_in_sdxl_family_repositories(exported_repository, manifest, tmp_path):
    source = exported_repository / manifest["tokenizer"]
    plain = _tokenizer_seeing(tmp_path / "plain", source, False)
    keeps = _tokenizer_seeing(tmp_path / "keeps", source, True)
    first_empty = triton_model.Preprocessor(tmp_path, {**manifest, "tokenizer": plain, "tokenizer_2": keeps})
    first_sees = triton_model.Preprocessor(tmp_path, {**manifest, "tokenizer": keeps, "tokenizer_2": plain})
    assert _rejected(first_empty, [READS_AS_EMPTY.encode()]) == "PROMPT is empty; send a non-empty caption"
    out = first_sees([READS_AS_EMPTY.encode()], [0])
    assert list(out["input_ids_2"][0]) == first_sees.tokenizers["input_ids_2"].encode("").ids  # empty for the 2nd
    assert list(out["input_ids"][0]) != first_sees.empty_ids
