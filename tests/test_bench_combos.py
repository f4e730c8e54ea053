"""boot_serve.bench.combos: exported combinations timed side by side, stage by stage, with accuracy read from
a distill.compare report."""

from __future__ import annotations

import json

import pytest

from boot_serve.bench import combos


def test_two_combinations_side_by_side(exported_repository, tmp_path):
    accuracy = tmp_path / "compare.json"
    accuracy.write_text(json.dumps({"generators": ["a", "b"], "n": 10, "splits": {"eval": {"generators": {
        "a": {"accuracy": 0.8, "single": 0.9, "two": 0.7, "sign_test_p": 1.0},
        "b": {"accuracy": 0.7, "single": 0.8, "two": 0.6, "sign_test_p": 0.03}}}}}))
    out = tmp_path / "out"
    assert combos.main(["--combo", f"a={exported_repository}", "--combo", f"b={exported_repository}",
                        "--requests", "6", "--warmup", "1", "--block", "2", "--accuracy", str(accuracy),
                        "--sd15-tiny", "--sd15-rounds", "2", "--out", str(out)]) == 0
    report = json.loads((out / "combos.json").read_text())
    assert list(report["combos"]) == ["a", "b"]
    for r in report["combos"].values():
        assert r["floor"]["count"] == 6 and len(r["latencies_ms"]) == 6
        # the three graphs are timed inside the request: together they fit in the end-to-end time
        assert 0 < sum(r["stages_p50_ms"].values()) <= r["floor"]["max_ms"] * 1.05
        assert r["decoder"]["kind"] == "full"
    assert report["combos"]["b"]["accuracy"]["eval"]["accuracy"] == pytest.approx(70.0)
    assert "eval 70.0% (two objects 60.0%), p = 0.03 vs a" in (out / "combos.md").read_text()
    assert (out / "combos.png").stat().st_size > 0
    # the SD-1.5-architecture parts: the compact UNets and the tiny decoder are smaller than what they replace
    parts = report["sd15"]
    assert set(parts) == {"UNet", "UNet, compact no-mid", "UNet, compact no-mid-attn", "VAE decoder", "tiny decoder"}
    assert parts["UNet, compact no-mid-attn"]["parameters"] < parts["UNet, compact no-mid"]["parameters"] < \
        parts["UNet"]["parameters"]
    assert all(r["p50_ms"] > 0 and r["rounds"] == 2 for r in parts.values())


@pytest.mark.parametrize("argv,message", [
    (["--combo", "a=/nonexistent"], "a repository written by python -m boot_serve.export"),
    (["--combo", "a"], "NAME=REPOSITORY"),
])
def test_bad_combinations_are_refused(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        combos.parse_args([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_one_combination_is_refused(exported_repository, tmp_path, capsys):
    with pytest.raises(SystemExit):
        combos.parse_args(["--combo", f"a={exported_repository}", "--out", str(tmp_path)])
    assert "two or more" in capsys.readouterr().err
