"""Export: ONNX repository, parity that fails loudly, fp16, TensorRT guard, OnnxPipeline.

Default tests run on a tiny random student (tests/tiny.py, perturbed condition projection so
the guidance input changes the image). `-m slow` exports the full-size SD-1.5 UNet
architecture; `-m gpu` builds TensorRT engines.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from boot_serve import export as ex
from boot_serve import runtime
from boot_serve.onnx_pipeline import OnnxPipeline
from tests.tiny import make_tiny_student, make_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "shapes-boot"
CASES = [  # (prompt, seed, guidance): default guidance, both ends of the range, extreme seeds
    ("a red circle", 0, None),
    ("a green triangle left of a yellow circle", 2**63 - 1, 1.0),
    ("a large blue square at the top left", 42, 5.0),
]


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def _have_tensorrt_machine() -> bool:
    return ex.tensorrt_problem() is None


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    return make_tiny_student(make_tiny_teacher(base / "teacher"), base / "student", perturb=0.1)


@pytest.fixture(scope="module")
def reference(student):
    from boot.pipeline import BootPipeline

    return BootPipeline.from_pretrained(student)


def _prefill(repo: Path) -> dict[Path, str]:
    """Files of the serving side (configs, Python models) that export must leave alone."""
    files = {repo / "boot_unet" / "config.pbtxt": 'name: "boot_unet"\n',
             repo / "tokenizer" / "1" / "model.py": "# serving model\n",
             repo / "text_encoder" / "1" / "model.py": "# python backend\n"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


@pytest.fixture(scope="module")
def repo32(student, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo32") / "model_repository"
    kept = _prefill(repo)
    return repo, ex.export(student, repo, "fp32"), kept


@pytest.fixture(scope="module")
def onnx_pipe(repo32):
    return OnnxPipeline.from_pretrained(repo32[0])


@pytest.fixture(scope="module")
def repo16(student, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo16") / "model_repository"
    stale = [repo / "boot_unet" / "1" / "model.onnx.data", repo / "boot_unet" / "1" / "model-trt9.0.0-sm80.plan"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old export")
    return repo, ex.export(student, repo, "fp16"), stale


# --------------------------------------------------------------------------------------------
# fp32: the acceptance criterion and the contract
# --------------------------------------------------------------------------------------------
def test_onnx_pipeline_matches_boot_pipeline(onnx_pipe, reference):
    for prompt, seed, w in CASES:
        ref = _arrays(reference([prompt], [seed], w))
        got = _arrays(onnx_pipe([prompt], [seed], w))
        assert got.shape == ref.shape == (1, 16, 16, 3)
        assert np.abs(got - ref).max() <= 2, (prompt, seed, w)
    # The check has power: guidance and seed both change the reference image.
    prompt, seed, _ = CASES[0]
    assert np.abs(_arrays(reference([prompt], [seed], 1.0)) - _arrays(reference([prompt], [seed], 5.0))).max() > 8
    assert np.abs(_arrays(reference([prompt], [1], None)) - _arrays(reference([prompt], [2], None))).max() > 8


def test_manifest_and_repository_layout(repo32, student):
    repo, info, kept = repo32
    saved = json.loads((repo / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["format"] == "boot-repository/1"
    assert saved["precision"] == "fp32"
    assert saved["source_student"] == str(Path(student).resolve())
    assert saved["latent_shape"] == [4, 8, 8] and saved["image_shape"] == [16, 16, 3]
    assert saved["max_length"] == 16 and saved["hidden_size"] == 384
    assert saved["init_noise_sigma"] == 1.0
    assert saved["guidance_range"] == [1.0, 5.0] and saved["guidance_scale"] == 3.0
    assert saved["export_seconds"] > 0 and "torch" in saved["versions"] and "onnx" in saved["versions"]
    assert (repo / saved["tokenizer"] / "tokenizer.json").is_file()
    # Contract of docs/interfaces.md, read from the graphs themselves, not from the manifest.
    contract = {
        "text_encoder": ([("input_ids", "tensor(int64)", ["batch", 16])],
                         [("text_states", "tensor(float)", ["batch", 16, 384])]),
        "boot_unet": ([("noise", "tensor(float)", ["batch", 4, 8, 8]),
                       ("text_states", "tensor(float)", ["batch", 16, 384]),
                       ("guidance_scale", "tensor(float)", ["batch"])],
                      [("latents", "tensor(float)", ["batch", 4, 8, 8])]),
        "vae_decoder": ([("latents", "tensor(float)", ["batch", 4, 8, 8])],
                        [("image", "tensor(uint8)", ["batch", 16, 16, 3])]),
    }
    for model, (inputs, outputs) in contract.items():
        graph = saved["graphs"][model]
        assert graph["path"] == f"{model}/1/model.onnx" and graph["external_data"] is None
        sess = runtime.session(repo / graph["path"])
        assert [(i.name, i.type, i.shape) for i in sess.get_inputs()] == inputs
        assert [(o.name, o.type, o.shape) for o in sess.get_outputs()] == outputs
        assert [i["name"] for i in graph["inputs"]] == [i[0] for i in inputs]
        assert graph["outputs"][0]["shape"][0] == "B" and graph["bytes"] > 0
        for out in graph["parity"].values():  # recorded, under tolerance, several batch sizes
            assert out["batches"] == [1, 3]
            assert out["max_abs"] <= (2 if "tolerance_levels" in out else 1e-3)
    e2e = saved["parity"]["end_to_end"]["image"]
    assert e2e["max_abs"] <= 2 and e2e["images"] == 15
    assert saved["parity"]["tokenizer"]["identical"]
    for path, text in kept.items():  # the serving side's files are untouched
        assert path.read_text() == text
    assert not list(repo.parent.glob(".model_repository-export-*")), "staging folder left behind"


def test_batch_invariance(repo32):
    pipe = OnnxPipeline.from_pretrained(repo32[0])
    prompts = ["a red circle", "a white triangle", "a blue square", "a red circle"]
    seeds = [5, 6, 7, 5]
    batch = _arrays(pipe(prompts, seeds, 4.0))
    alone = np.concatenate([_arrays(pipe([p], [s], 4.0)) for p, s in zip(prompts, seeds)])
    pipe.batch_size = 3  # chunked: 3 + 1
    chunked = _arrays(pipe(prompts, seeds, 4.0))
    assert np.abs(batch - alone).max() <= 1
    assert np.abs(batch - chunked).max() <= 1
    assert np.array_equal(batch[0], batch[3])  # same (prompt, seed) at two positions
    assert np.abs(batch[0] - batch[1]).max() > 8


@pytest.mark.parametrize("args", [
    ([], []), ("a red circle", [0]), (["a red circle"], [0, 1]), ([""], [0]), (["  "], [0]),
    (["\x00\u200b\u0301"], [0]), (["a red circle", "\ufffd"], [0, 1]),  # no content; the tokenizer's empty
    (["a red circle"], [-1]), (["a red circle"], [2**63]), (["a red circle"], [True]), (["a red circle"], [1.5]),
    (["a red circle"], [0], float("nan")), (["a red circle"], [0], 5.5), (["a red circle"], [0], "3"),
])
def test_input_validation_same_as_boot_pipeline(onnx_pipe, reference, args):
    with pytest.raises(ValueError) as ours:
        onnx_pipe(*args)
    with pytest.raises(ValueError) as theirs:
        reference(*args)
    assert str(ours.value) == str(theirs.value)


def test_onnx_pipeline_needs_no_torch(repo32):
    code = ("import sys; from boot_serve import OnnxPipeline; "
            f"p = OnnxPipeline.from_pretrained({str(repo32[0])!r}); im = p(['a red circle'], [0])[0]; "
            "assert im.size == (16, 16), im.size; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(p.providers)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if not runtime.gpu_available():
        assert out.stdout.strip() == "['CPUExecutionProvider']"
        assert "CUDA" not in out.stderr and "error" not in out.stderr.lower()  # no provider noise


def test_provider_selection(monkeypatch):
    import onnxruntime

    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    def choose(gpus: int, libs: bool, trt_env: str = "", listed=gpu_build) -> tuple[str, ...]:
        runtime.default_providers.cache_clear()
        # The providers onnxruntime-gpu lists (CPU machines install the CPU build, which lists none of them).
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(listed))
        monkeypatch.setattr(runtime, "cuda_device_count", lambda: gpus)
        monkeypatch.setattr(runtime, "_cuda_libraries", lambda: libs)
        monkeypatch.setattr(runtime, "_loadable", lambda *names: True)
        monkeypatch.setenv(runtime.TENSORRT_ENV, trt_env)
        return runtime.default_providers()

    try:
        assert choose(0, True) == ("CPUExecutionProvider",)  # CUDA EP listed, but no GPU
        assert choose(1, False) == ("CPUExecutionProvider",)  # GPU, but no CUDA runtime / cuDNN
        assert choose(1, True) == ("CUDAExecutionProvider", "CPUExecutionProvider")
        assert choose(1, True, "1") == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
        assert choose(1, True, "1", listed=["CPUExecutionProvider"]) == ("CPUExecutionProvider",)  # the CPU build
    finally:
        runtime.default_providers.cache_clear()


@pytest.mark.skipif(not (SHIPPED / "boot.json").is_file(), reason="pretrained/shapes-boot not there yet")
def test_shipped_student_exports_within_two_minutes(tmp_path):
    info = ex.export(SHIPPED, tmp_path / "model_repository", "fp32")
    print(json.dumps({"export_seconds": info["export_seconds"], "parity": info["parity"]}, indent=1))
    assert info["export_seconds"] < 120
    assert info["parity"]["end_to_end"]["image"]["max_abs"] <= 2


def test_sd_style_student_exports(tmp_path):
    """Own text_encoder/ + tokenizer/ folders, epsilon prediction on SD's schedule (alpha_T > 0)."""
    from boot.pipeline import BootPipeline

    teacher = make_tiny_teacher(tmp_path / "t", "epsilon", zero_snr=False, text_kind="folder")
    student = make_tiny_student(teacher, tmp_path / "s", perturb=0.1)
    info = ex.export(student, tmp_path / "repo", "fp32", parity_batches=(2,), e2e_prompts=2)
    assert info["hidden_size"] == 32 and info["student"]["prediction_type"] == "epsilon"
    assert info["student"]["parameterization"] == "teacher-at-T"
    prompts, seeds = [c[0] for c in CASES], [c[1] for c in CASES]
    got = _arrays(OnnxPipeline.from_pretrained(tmp_path / "repo")(prompts, seeds, 2.0))
    ref = _arrays(BootPipeline.from_pretrained(student)(prompts, seeds, 2.0))
    assert np.abs(got - ref).max() <= 2


# --------------------------------------------------------------------------------------------
# fp16
# --------------------------------------------------------------------------------------------
def test_fp16_export_is_finite_close_and_really_fp16(repo16, repo32):
    repo, info, stale = repo16
    assert info["precision"] == "fp16"
    tol = ex.TOLERANCES["fp16"]
    for model in ex.MODELS:
        graph = info["graphs"][model]
        for err in graph["parity"].values():
            assert err["max_abs"] <= (tol.image_levels if "tolerance_levels" in err else 1.0)
            print(f"fp16 {model}: {err}")  # the error vs PyTorch fp32, reported with -s
        weights16 = onnx.load(str(repo / graph["path"])).graph.initializer
        weights32 = onnx.load(str(repo32[0] / graph["path"])).graph.initializer
        assert sum(t.ByteSize() for t in weights16) < 0.55 * sum(t.ByteSize() for t in weights32)  # really fp16
        dtypes = [t.data_type for t in weights16]
        assert dtypes.count(onnx.TensorProto.FLOAT16) > dtypes.count(onnx.TensorProto.FLOAT)
        assert graph["fp16"]["fp32_nodes"] > 0  # normalizations etc. kept in fp32
        # inputs/outputs stay fp32 / int64 / uint8 at the boundary
        assert graph["inputs"] == repo32[1]["graphs"][model]["inputs"]
        assert graph["outputs"] == repo32[1]["graphs"][model]["outputs"]
    print(f"fp16 end to end: {info['parity']['end_to_end']}")
    pipe16, pipe32 = OnnxPipeline.from_pretrained(repo), OnnxPipeline.from_pretrained(repo32[0])
    prompts, seeds = [c[0] for c in CASES], [c[1] for c in CASES]
    a16, a32 = _arrays(pipe16(prompts, seeds)), _arrays(pipe32(prompts, seeds))
    assert a16.max(axis=(1, 2, 3)).min() > 0  # no black image
    assert np.abs(a16 - a32).max() <= tol.image_levels
    lat = pipe16.latents(prompts, seeds)
    assert np.isfinite(lat).all()
    assert not any(p.exists() for p in stale)  # an older export's weights and engines are gone


def test_fp16_keeps_embeddings_and_postprocess_in_fp32(repo16):
    """Sin/Cos of the time and guidance embeddings and the uint8 postprocess must be computed
    from fp32 values, never through an fp16 hop (fp16 spacing near 1000 is 0.5)."""
    repo = repo16[0]

    def upstream_ops(graph, tensor: str, stop: str) -> list[tuple[str, int | None]]:
        producer = {o: n for n in graph.node for o in n.output}
        chain = []
        while tensor in producer and producer[tensor].op_type != stop:
            node = producer[tensor]
            chain.append((node.op_type, next((a.i for a in node.attribute if a.name == "to"), None)))
            if not node.input:
                break
            tensor = node.input[0]
        return chain

    unet = onnx.load(str(repo / "boot_unet/1/model.onnx")).graph
    sins = [n for n in unet.node if n.op_type in ("Sin", "Cos")]
    assert len(sins) >= 4  # time embedding and the student's (t, w) condition
    for node in sins:
        assert (("Cast", onnx.TensorProto.FLOAT16)) not in upstream_ops(unet, node.input[0], "Shape")
    vae = onnx.load(str(repo / "vae_decoder/1/model.onnx")).graph
    post = upstream_ops(vae, "image", "Conv")
    assert ("Round", None) in post and ("Cast", onnx.TensorProto.FLOAT16) not in post


# --------------------------------------------------------------------------------------------
# Failing loudly
# --------------------------------------------------------------------------------------------
def _corrupting(monkeypatch, graph: str, damage):
    """Make export write a damaged `graph`: the trace is right, the file on disk is not."""
    from boot_serve.export import graphs

    original = graphs.export_graph

    def export_graph(module, args, spec, path, *rest):
        original(module, args, spec, path, *rest)
        if spec.name == graph:
            model = onnx.load(str(path))
            damage(model)
            onnx.save(model, str(path))

    monkeypatch.setattr(graphs, "export_graph", export_graph)  # what export_graphs calls


def _scale_weight(name_part: str, factor: float):
    def damage(model):
        from onnx import numpy_helper

        init = next(t for t in model.graph.initializer if name_part in t.name and len(t.dims) == 4)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return damage


def test_corrupted_unet_fails_the_cli(student, tmp_path, monkeypatch, capsys):
    # A 2% error in one convolution of the student: subtle, and still caught.
    _corrupting(monkeypatch, "boot_unet", _scale_weight("conv_in", 1.02))
    repo = tmp_path / "model_repository"
    rc = ex.main(["--student", str(student), "--repository", str(repo)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "boot_unet" in err and "'latents'" in err and "relative" in err
    assert not (repo / "manifest.json").exists() and not (repo / "boot_unet/1/model.onnx").exists()


def test_corrupted_vae_fails_with_parity_error(student, tmp_path, monkeypatch):
    _corrupting(monkeypatch, "vae_decoder", _scale_weight("conv_out", -1.0))
    with pytest.raises(ex.ParityError, match=r"graph 'vae_decoder', output 'image'.*max abs error \d+/255"):
        ex.export(student, tmp_path / "model_repository", "fp32", parity_batches=(2,))


def test_nan_output_is_a_parity_error():
    ref = np.ones((2, 4), np.float32)
    bad = ref.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ex.ParityError, match="NaN"):
        ex.compare("boot_unet", "latents", bad, ref, ex.TOLERANCES["fp16"], "test")
    black = np.zeros((1, 4, 4, 3), np.uint8)
    with pytest.raises(ex.ParityError, match="all-black"):
        ex.compare("vae_decoder", "image", black, black + 1, ex.TOLERANCES["fp16"], "test")


# --------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(_have_tensorrt_machine(), reason="this machine can build TensorRT engines")
def test_tensorrt_without_gpu_is_a_clear_error(student, tmp_path):
    repo = tmp_path / "model_repository"
    out = subprocess.run([sys.executable, "-m", "boot_serve.export", "--student", str(student),
                          "--repository", str(repo), "--tensorrt"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--tensorrt" in out.stderr and "GPU" in out.stderr
    assert not repo.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _have_tensorrt_machine(), reason=f"needs a GPU machine: {ex.tensorrt_problem()}")
def test_tensorrt_engines(student, tmp_path):
    import tensorrt as trt

    repo = tmp_path / "model_repository"
    info = ex.export(student, repo, "fp16", tensorrt=True, max_batch=8)
    trt_info = info["tensorrt"]
    assert trt_info["version"] == trt.__version__
    for model in ex.MODELS:
        plan = trt_info["plans"][model]
        assert (repo / plan["path"]).is_file() and trt.__version__ in plan["path"]
        assert plan["profile"] == {"min": 1, "opt": 4, "max": 8}
        assert set(plan["parity"]) == set(ex.SPECS[model].outputs)
        print(model, plan)


# --------------------------------------------------------------------------------------------
# Full-size SD-1.5 UNet architecture (random weights)
# --------------------------------------------------------------------------------------------
def make_sd15_student(folder: Path) -> Path:
    """SD-1.5's UNet (published config), epsilon prediction on SD's scaled-linear schedule,
    with a 768-wide text encoder (1-layer BERT, L = 77) and a tiny VAE: the UNet is the point."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    from boot import text
    from boot.method import add_condition_projection
    from tests.tiny import scheduler_config, tiny_vae

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    add_condition_projection(unet)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.05)
    unet.save_pretrained(folder / "unet")
    BertModel(BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=1024,
                         max_position_embeddings=128)).save_pretrained(folder / "text_encoder")
    tok = text.load_tokenizer(77)
    tok.save_pretrained(folder / "tokenizer")
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(folder / "vae")
    DDIMScheduler(**scheduler_config("epsilon", zero_snr=False)).save_pretrained(folder / "scheduler")
    (folder / "boot.json").write_text(json.dumps({
        "format": "boot-student/1", "teacher": "sd-1.5 architecture, random weights", "prompts": "test",
        "prediction_type": "epsilon", "input_timestep": 999, "guidance_range": [1.0, 12.0],
        "guidance_scale": 7.5, "latent_shape": [4, 64, 64], "steps": 0, "hyperparameters": {},
    }))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sd15_unet_exports_with_parity(tmp_path, precision):
    student = make_sd15_student(tmp_path / "sd15")
    info = ex.export(student, tmp_path / "model_repository", precision, parity_batches=(1, 2), e2e_prompts=1)
    unet = info["graphs"]["boot_unet"]
    print(json.dumps({"precision": precision, "export_seconds": info["export_seconds"], "unet": unet,
                      "end_to_end": info["parity"]["end_to_end"]}, indent=1))
    assert (unet["external_data"] is not None) == (precision == "fp32")  # 3.4 GB fp32, 1.7 GB fp16
    assert unet["inputs"][0]["shape"] == ["B", 4, 64, 64]
    assert os.path.getsize(tmp_path / "model_repository" / unet["path"]) < 2**31
