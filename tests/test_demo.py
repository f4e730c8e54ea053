"""The gradio demo in a real browser: headless Chromium (Debian `chromium`) driven by Playwright.

`python -m demo.app` is started on a free 127.0.0.1 port with the in-process ONNX backend over
the tiny repository that `python -m boot_serve.export` wrote (conftest.py) and the tiny teacher
for the side-by-side view. The page is used as a person would: type a prompt, click Generate;
the gallery's images are fetched from their `src` and decoded, and must be exactly the
OnnxPipeline's images for that prompt and those seeds (teacher: TeacherSampler's).
Screenshots are kept under the test's tmp dir. `-m slow` also shows the shipped student served by
tritonserver, 4 images beside the teacher's at 50 steps; with BOOT_SAVE_ARTIFACTS=1 that screenshot
becomes docs/demo_screenshot.png. Browser tests skip only when no Chromium is installed
(`apt-get install chromium`); the demo's glue (boot_serve/demo_backend.py) is tested without one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boot_serve import demo_backend as db
from boot_serve.triton_process import find_free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "a red circle"
TIMEOUT_MS = 90_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("BOOT_CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def teacher_dir(served_student) -> Path:
    return Path(json.loads((Path(served_student) / "boot.json").read_text())["teacher"])


@pytest.fixture(scope="module")
def app_url(exported_repository, teacher_dir, tmp_path_factory):
    """`python -m demo.app` on a free port; its log is shown if it fails to come up."""
    if chromium_path() is None:  # before starting anything: the browser tests are all that use the app
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    work = tmp_path_factory.mktemp("demo")
    port = find_free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(work / "gradio"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(work / "app.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "demo.app", "--repository", str(exported_repository),
                             "--teacher", str(teacher_dir), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo.app exited with {proc.returncode}:\n{(work / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo.app not up after 180 s:\n{(work / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.locator("#prompt textarea").wait_for(timeout=TIMEOUT_MS)
    yield page
    page.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _gallery_images(page, elem_id: str, n: int) -> list[np.ndarray]:
    """Wait for n images in the gallery, fetch each one's src and decode it."""
    from playwright.sync_api import expect

    imgs = page.locator(f"#{elem_id} img")
    expect(imgs).to_have_count(n, timeout=TIMEOUT_MS)
    arrays = []
    for i in range(n):
        src = imgs.nth(i).get_attribute("src")
        response = page.request.get(src)
        assert response.ok, src
        with Image.open(io.BytesIO(response.body())) as im:
            assert im.format == "PNG"  # lossless: the pixels are the model's
            arrays.append(np.asarray(im.convert("RGB")))
    return arrays


def _expected_size(repository: Path) -> tuple[int, int, int]:
    h, w, c = json.loads((repository / "manifest.json").read_text())["image_shape"]
    return h, w, c


# --------------------------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------------------------
def test_prompt_to_images_in_the_gallery(page, exported_repository, tmp_path):
    from boot_serve.onnx_pipeline import OnnxPipeline

    page.locator("#prompt textarea").fill(PROMPT)
    _set_number(page, "seed", 5)
    _set_number(page, "n-images", 2)
    page.locator("#generate").click()
    shown = _gallery_images(page, "gallery", 2)
    assert all(a.shape == _expected_size(exported_repository) for a in shown)
    expected = [np.asarray(im) for im in OnnxPipeline.from_pretrained(exported_repository)([PROMPT] * 2, [5, 6])]
    for got, want in zip(shown, expected):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    status = page.locator("#status").inner_text()
    assert "2 images in" in status and " ms" in status and "seeds 5..6" in status
    assert "Error" not in status
    assert_images_whole_and_enlarged(page, "gallery", 2, _expected_size(exported_repository)[1])
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)


def assert_images_whole_and_enlarged(page, elem_id: str, n: int, width: int) -> None:
    """Every image of the gallery lies whole inside it, on the page, at least twice its pixel size, and
    is drawn without smoothing."""
    box = page.locator(f"#{elem_id}").bounding_box()
    imgs = page.locator(f"#{elem_id} img")
    for i in range(n):
        img = imgs.nth(i)
        b = img.bounding_box()
        assert b["width"] >= 2 * width and abs(b["width"] - b["height"]) <= 1, b
        assert box["x"] <= b["x"] and b["x"] + b["width"] <= box["x"] + box["width"] + 0.5, (i, b, box)
        assert box["y"] <= b["y"] and b["y"] + b["height"] <= box["y"] + box["height"] + 0.5, (i, b, box)
        assert b["x"] + b["width"] <= page.viewport_size["width"]
        assert img.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"


def test_side_by_side_with_the_teacher(page, exported_repository, teacher_dir, tmp_path):
    from boot.samplers import TeacherSampler

    page.locator("#prompt textarea").fill(PROMPT)
    _set_number(page, "seed", 5)
    page.locator("#compare input").check()
    _set_number(page, "teacher-steps", 2)
    page.locator("#generate").click()
    (student,) = _gallery_images(page, "gallery", 1)
    (teacher,) = _gallery_images(page, "teacher-gallery", 1)
    for gallery in ("gallery", "teacher-gallery"):
        assert_images_whole_and_enlarged(page, gallery, 1, _expected_size(exported_repository)[1])
    assert student.shape == teacher.shape == _expected_size(exported_repository)
    manifest = json.loads((exported_repository / "manifest.json").read_text())
    want = np.asarray(TeacherSampler(teacher_dir, 2)([PROMPT], [5], manifest["guidance_scale"])[0])
    assert np.abs(teacher.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(teacher.astype(int) - student.astype(int)).max() > 0  # two different generators
    status = page.locator("#status").inner_text()
    assert "Teacher (DDIM, 2 steps)" in status and "faster" in status
    shot = tmp_path / "demo_side_by_side.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.width >= 1000


def test_random_seed_is_shown_and_used(page):
    page.locator("#prompt textarea").fill(PROMPT)
    _set_number(page, "seed", 0)
    page.locator("#random-seed input").check()
    page.locator("#generate").click()
    _gallery_images(page, "gallery", 1)
    seed = page.locator("#seed input[type=number]").input_value()
    assert seed != "0" and 0 <= int(seed) < 2**31
    assert f"seed {seed}" in page.locator("#status").inner_text()


def test_bad_prompt_shows_a_readable_error(page):
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    status = page.locator("#status")
    status.get_by_text("Error").wait_for(timeout=TIMEOUT_MS)
    text = status.inner_text()
    assert "Invalid input" in text and "prompt" in text and "non-empty" in text
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and 'File "' not in body
    assert page.locator("#gallery img").count() == 0


# --------------------------------------------------------------------------------------------
# Glue, no browser
# --------------------------------------------------------------------------------------------
def test_server_down_is_a_readable_error():
    session = db.DemoSession(db.TritonBackend(f"127.0.0.1:{find_free_port()}", "http"))
    out = session.run(PROMPT, 0, 1, None)
    assert not out.ok and out.images == []
    assert out.errors[0].startswith("Server unavailable: no Triton server answers")
    assert "python -m boot_serve.serve" in out.errors[0]
    status = session.status(out)
    assert status.startswith("**Error:**") and "Traceback" not in status


def test_server_rejection_is_a_readable_error(triton_server):
    session = db.DemoSession(db.TritonBackend(triton_server.http_url, "http"))
    out = session.run("", 0, 1, None)
    assert out.errors and out.errors[0].startswith("The server rejected the request:")
    assert "PROMPT" in out.errors[0] and "empty" in out.errors[0]
    long = session.run("a red circle left of a blue square " * 4, 0, 1, None)
    assert long.errors and "tokens long" in long.errors[0] and "Traceback" not in long.errors[0]
    ok = session.run(PROMPT, 3, 2, 2.0)
    assert ok.ok and len(ok.images) == 2 and ok.student_seconds > 0


@pytest.mark.parametrize("seed, n, message", [
    (-1, 1, "seed must be in"), (1.5, 1, "integer"), (None, 1, "integer"), (0, 0, "number of images"),
    (0, db.MAX_IMAGES + 1, "number of images"), (db.MAX_UI_SEED, 2, "seed must be in"),
])
def test_bad_controls_are_rejected_before_the_model(seed, n, message):
    class Never:
        label, guidance_range, guidance_scale = "never", (1.0, 5.0), 3.0

        def generate(self, *a):
            raise AssertionError("the model must not be called")

    out = db.DemoSession(Never()).run(PROMPT, seed, n, 3.0)
    assert out.errors and out.errors[0].startswith("Invalid input") and message in out.errors[0]


def test_backend_choice(exported_repository, tmp_path):
    backend = db.load_backend(None, "http", exported_repository)
    assert isinstance(backend, db.PipelineBackend) and "ONNX Runtime" in backend.label
    manifest = json.loads((exported_repository / "manifest.json").read_text())
    assert backend.guidance_range == tuple(manifest["guidance_range"])
    triton = db.load_backend("127.0.0.1:9", "grpc", exported_repository)
    assert isinstance(triton, db.TritonBackend) and triton.guidance_known
    assert triton.guidance_range == tuple(manifest["guidance_range"])
    with pytest.raises(FileNotFoundError, match="--url"):
        db.load_backend(None, "http", tmp_path / "nothing")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_guidance_range_comes_from_the_server(triton_server, exported_repository, protocol):
    """With only --url (no repository on this machine), the slider still spans the student's range."""
    from boot_serve.client import Client

    manifest = json.loads((exported_repository / "manifest.json").read_text())
    want = (tuple(manifest["guidance_range"]), manifest["guidance_scale"])
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    with Client(url, protocol) as client:
        assert client.guidance() == want
    backend = db.load_backend(url, protocol, None)
    assert backend.guidance_known and (backend.guidance_range, backend.guidance_scale) == want
    assert manifest["guidance_range"] != list(db.FALLBACK_GUIDANCE[0])  # a real test: the tiny student's range


@pytest.mark.slow
def test_shipped_student_on_triton_screenshot(tmp_path):
    """docs/demo_screenshot.png: pretrained/shapes-boot exported, served by tritonserver (the default
    CPU variant), 4 images and the teacher's at 50 steps, every image whole in its grid."""
    if chromium_path() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from boot_serve.triton_server import TritonServer

    repo = tmp_path / "model_repository"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    subprocess.run([sys.executable, "-m", "boot_serve.export", "--student", str(ROOT / "pretrained" / "shapes-boot"),
                    "--repository", str(repo)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    port = find_free_port()
    with TritonServer(repo, exit_timeout=5) as server:
        proc = subprocess.Popen([sys.executable, "-m", "demo.app", "--url", server.http_url, "--teacher",
                                 str(ROOT / "pretrained" / "shapes-teacher"), "--port", str(port)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None, "demo.app did not come up"
                    time.sleep(0.5)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url)
                page.locator("#prompt textarea").fill("a blue triangle right of a white triangle")
                _set_number(page, "seed", 3)
                _set_number(page, "n-images", 4)
                page.locator("#compare input").check()
                _set_number(page, "teacher-steps", 50)
                page.locator("#generate").click()
                student, teacher = _gallery_images(page, "gallery", 4), _gallery_images(page, "teacher-gallery", 4)
                assert all(a.shape == (64, 64, 3) for a in student + teacher)
                for gallery in ("gallery", "teacher-gallery"):
                    assert_images_whole_and_enlarged(page, gallery, 4, 64)
                assert "4 images in" in page.locator("#status").inner_text()
                shot = tmp_path / "demo_screenshot.png"
                page.screenshot(path=str(shot), full_page=True)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if os.environ.get("BOOT_SAVE_ARTIFACTS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "demo_screenshot.png")
