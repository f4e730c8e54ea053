"""distill.compare: students (and each with the tiny decoder) judged on the same captions and noise, each
against the first with an exact sign test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill import compare

ROOT = Path(__file__).resolve().parents[1]
STUDENT, TINY = ROOT / "pretrained" / "shapes-boot", ROOT / "pretrained" / "shapes-tiny-decoder"


def test_sign_test_is_the_exact_two_sided_binomial():
    assert compare.sign_test(0, 0) == 1.0
    assert compare.sign_test(0, 10) == pytest.approx(2 / 1024)
    assert compare.sign_test(3, 7) == compare.sign_test(7, 3) == pytest.approx(2 * 176 / 1024)


def test_each_student_with_both_decoders_against_the_first(tmp_path):
    compare.main([str(STUDENT), "--tiny-decoder", str(TINY), "--n", "6", "--splits", "eval",
                  "--reference-split", "", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["generators"] == ["shapes-boot", "shapes-boot+tiny"]
    full, tiny = (report["splits"]["eval"]["generators"][k] for k in report["generators"])
    assert (full["first_only"], full["this_only"], full["sign_test_p"]) == (0, 0, 1.0)
    # the tiny decoder's verdicts differ from the full one's on exactly first_only + this_only captions
    assert tiny["accuracy"] - full["accuracy"] == pytest.approx((tiny["this_only"] - tiny["first_only"]) / 6)
    assert f"| shapes-boot | {100 * full['accuracy']:.1f}% |" in (tmp_path / "compare.md").read_text()
    assert tiny["sign_test_p"] == compare.sign_test(tiny["first_only"], tiny["this_only"])
    assert "| shapes-boot+tiny |" in (tmp_path / "compare.md").read_text()


def test_nothing_to_compare_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main([str(STUDENT), "--out", str(tmp_path)])
    assert "nothing to compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(STUDENT), str(STUDENT), "--splits", "eval,test", "--out", str(tmp_path)])
    assert "unknown split test" in capsys.readouterr().err
