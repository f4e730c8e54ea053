"""Security promises of docs/operations.md "Security", each checked:
servers and demo bind 127.0.0.1 unless told otherwise and warn when told; nothing in the
project unpickles (weights and checkpoints are safetensors); no secrets or machine paths are
committed. (Server-side limits on prompt bytes, tokens and batch size: test_serving.py and
test_robustness.py.)"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


# --------------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------------
def test_triton_binds_localhost_by_default(tmp_path):
    from boot_serve.triton_server import TritonServer

    server = TritonServer(tmp_path, tritonserver="/bin/true", http_port=1, grpc_port=2, metrics_port=3)
    cmd, _ = server.command()
    for endpoint in ("http", "grpc", "metrics"):
        assert f"--{endpoint}-address=127.0.0.1" in cmd
    # Explicit mode loads only the client-facing model (and what it composes); shared memory, the model
    # repository, trace and logging sit behind a random key nobody is given, statistics behind the
    # operator key, on both protocols.
    assert "--model-control-mode=explicit" in cmd and "--load-model=boot_txt2img" in cmd
    for option in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        closed = option + "shared-memory,model-repository,trace,logging:boot-operator-key="
        keys = [a[len(closed):] for a in cmd if a.startswith(closed)]
        assert len(keys) == 1 and len(keys[0]) >= 32 and keys[0] != server.operator_key
        assert f"{option}statistics:boot-operator-key={server.operator_key}" in cmd
    assert TritonServer(tmp_path).operator_key != server.operator_key  # a key per server


def test_serve_cli_defaults_and_warns_on_a_public_address(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "boot_serve.serve", "--help"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert re.search(r"--host HOST\s+[^-]*default: 127\.0\.0\.1", proc.stdout.replace("\n", " "))
    proc = subprocess.run([sys.executable, "-m", "boot_serve.serve", "--repository", str(tmp_path / "none"),
                           "--host", "0.0.0.0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "WARNING: binding Triton to '0.0.0.0', not 127.0.0.1. Triton has no authentication" in proc.stderr


def test_demo_defaults_and_warns_on_a_public_address(tmp_path):
    from demo import app

    assert app.parse_args([]).host == "127.0.0.1"
    proc = subprocess.run([sys.executable, "-m", "demo.app", "--repository", str(tmp_path / "none"),
                           "--host", "0.0.0.0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "warning: the demo binds 0.0.0.0, not 127.0.0.1" in proc.stderr


# --------------------------------------------------------------------------------------------
# No pickle
# --------------------------------------------------------------------------------------------
def unsafe_loads(source: str) -> list[str]:
    """Calls that can unpickle: torch.load without weights_only=True, pickle/dill/joblib loads,
    numpy.load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kwargs:
            if kwargs.get("weights_only") != "True":
                found.append(f"{name} at line {node.lineno}")
        elif re.fullmatch(r"(c?pickle|dill|joblib|cloudpickle)\.(load|loads)|pickle\.Unpickler", name):
            found.append(f"{name} at line {node.lineno}")
        elif re.fullmatch(r"(np|numpy)\.load", name) and kwargs.get("allow_pickle") == "True":
            found.append(f"{name}(allow_pickle=True) at line {node.lineno}")
        elif (name.endswith(".from_pretrained") and not WEIGHTLESS.search(name)
              and kwargs.get("use_safetensors") != "True"):
            # Without use_safetensors=True diffusers/transformers fall back to a pickled .bin file
            # when the safetensors one is missing.
            found.append(f"{name} without use_safetensors=True at line {node.lineno}")
    return found


# from_pretrained of parts that hold no weights (text files only), and the project's own pipelines,
# whose from_pretrained passes use_safetensors=True to every weight load inside (scanned here too).
WEIGHTLESS = re.compile(r"Tokenizer|tokenizer|Scheduler|scheduler|Config\b|config\b|BootPipeline|OnnxPipeline")


def test_the_scanner_finds_unsafe_loads():
    assert len(unsafe_loads("import torch, pickle, numpy as np\ntorch.load('a')\npickle.loads(b)\n"
                            "np.load('x', allow_pickle=True)\ntorch.load('a', weights_only=False)\n")) == 4
    assert unsafe_loads("torch.load('a', weights_only=True)\nnp.load('x')\nsafetensors.torch.load_file('a')\n") == []
    assert len(unsafe_loads("UNet2DConditionModel.from_pretrained(d)\n"
                            "AutoModel.from_pretrained(d, use_safetensors=False)\n")) == 2
    assert unsafe_loads("AutoTokenizer.from_pretrained(d)\nDDIMScheduler.from_pretrained(d)\n"
                        "AutoencoderKL.from_pretrained(d, use_safetensors=True)\n") == []


def test_a_pickled_weights_file_is_never_opened(tmp_path):
    """A teacher folder whose UNet weights exist only as a pickle that would run code when loaded:
    loading fails with a clear error and the code never runs."""
    import pickle

    from tests.tiny import make_tiny_teacher

    folder = make_tiny_teacher(tmp_path / "teacher")
    marker = tmp_path / "pickle-ran"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    proc = subprocess.run([sys.executable, "-m", "distill.run", "--teacher", str(folder), "--steps", "1",
                           "--out", str(tmp_path / "student"), "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unet" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_nothing_in_the_project_unpickles():
    found = {str(p.relative_to(ROOT)): hits for p in tracked_files() if p.suffix == ".py"
             if (hits := unsafe_loads(p.read_text()))}
    assert found == {}


def test_committed_weights_are_safetensors_only():
    weights = [p for p in tracked_files() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".onnx",
                                                          ".plan", ".engine", ".safetensors")]
    assert weights, "the shipped teacher's weights should be tracked"
    assert {p.suffix for p in weights} == {".safetensors"}, weights


# --------------------------------------------------------------------------------------------
# No secrets, no machine paths
# --------------------------------------------------------------------------------------------
SECRETS = {
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "AWS key": r"AKIA[0-9A-Z]{16}",
    "GitHub token": r"gh[pousr]_[A-Za-z0-9]{36}",
    "Hugging Face token": r"hf_[A-Za-z0-9]{34}",
    "NGC key": r"nvapi-[A-Za-z0-9_-]{40,}",
    "password assignment": r"(?i)password\s*[:=]\s*['\"][^'\"]{4,}",
}
MACHINE_PATHS = r"(?<![\w.])/(home|Users|root|work|tmp/pytest-of-)/[\w.-]+"


@pytest.mark.parametrize("what", [*SECRETS, "machine path"])
def test_no_secrets_or_machine_paths_are_committed(what):
    pattern = re.compile(SECRETS.get(what, MACHINE_PATHS))
    hits = []
    for path in tracked_files():
        if path.suffix in (".png", ".safetensors") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                 for m in pattern.finditer(text)]
    assert hits == []


def test_the_secret_patterns_match_what_they_name():
    # Built at run time, so that this file does not hold what it scans for.
    j = "".join
    samples = {"private key": j(["-----BEGIN RSA ", "PRIVATE KEY-----"]), "AWS key": j(["AKIA", "ABCDEFGHIJKLMNOP"]),
               "GitHub token": "ghp_" + "a" * 36, "Hugging Face token": "hf_" + "b" * 34,
               "NGC key": "nvapi-" + "c" * 50, "password assignment": j(["pass", 'word = "hunter22"'])}
    for what, sample in samples.items():
        assert re.search(SECRETS[what], sample), what
    assert re.search(MACHINE_PATHS, j(["see /ho", "me/alice/models"]))
    assert not re.search(MACHINE_PATHS, "/opt/tritonserver")
