"""examples/imagenet_resnet50: the PIL image-folder reader, the ResNet definitions and analyze.py
end to end on a tiny generated image folder with a tiny ResNet (ekfac + query rank, sketched on
disk, bfloat16)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.stats
import torch

from sketchattr.data.image_folder import CenterCropTransform, ImageFolderDataset
from sketchattr.bench.models.resnet import CheckpointError, ResNet, load_weights, resnet50, tiny_resnet

Image = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fish")


def _load_analyze():
    spec = importlib.util.spec_from_file_location("imagenet_analyze", ROOT / "examples" / "imagenet_resnet50" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


analyze = _load_analyze()


def _write_folder(root: Path, per_class: dict[str, int], seed: int) -> None:
    """root/<class>/<i>.png|jpg, 20×24 RGB images whose colour depends on the class."""
    rng = np.random.RandomState(seed)
    for split, n in per_class.items():
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.rand(20, 24, 3) * 90 + 70 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.{'png' if i % 2 else 'JPEG'}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet_tiny")
    _write_folder(root, {"train": 8, "val": 2}, seed=0)
    return root


@pytest.fixture(scope="module")
def checkpoint(image_root) -> Path:
    torch.manual_seed(1)
    path = image_root / "tiny.pt"
    torch.save(tiny_resnet(3).state_dict(), path)
    return path


def _argv(root: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--dataset_dir", str(root), "--model", "tiny", "--checkpoint", str(ckpt), "--resize", "32", "--crop", "32",
            "--output_dir", str(out), "--query_batch_size", "4", "--train_batch_size", "8", "--proj_dim", "256",
            "--top_k", "3", "--show_queries", "2", "--no_progress", *extra]


def _scores(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(out / "scores.h5") as f:
        return f["scores"][:], f["train_indices"][:], f["query_indices"][:]


# ---------------------------------------------------------------------------- image folder
def test_image_folder_labels_and_shapes(image_root):
    train = ImageFolderDataset(image_root / "train", CenterCropTransform(resize=32, crop=32))
    assert train.classes == list(CLASSES) and len(train) == 24  # notes.txt skipped
    assert train.targets.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert [Path(p).name for p, _ in train.samples[:3]] == ["00.JPEG", "01.png", "02.JPEG"]
    x, y = train[9]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == 1
    val = ImageFolderDataset(image_root / "val", CenterCropTransform(32, 32), classes=["ant", *CLASSES])
    assert len(val) == 6 and val.targets.tolist() == [1, 1, 2, 2, 3, 3]


def test_center_crop_transform_matches_numpy():
    pixels = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    x = CenterCropTransform(resize=None, crop=4, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(pixels))
    expected = torch.from_numpy(pixels[1:5, 2:6].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(x, expected)
    resized = CenterCropTransform(resize=12, crop=10)(Image.fromarray(pixels))  # 6×8 -> 12×16 -> 10×10
    assert resized.shape == (3, 10, 10) and torch.isfinite(resized).all()


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match=r"class folder .*b holds no image files"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        ImageFolderDataset(tmp_path, classes=["a"])


# ---------------------------------------------------------------------------- models and weights
def test_resnet50_has_torchvision_layout():
    model = resnet50(1000, use_torchvision=False)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert len(state) == 320  # 53 convs, 53 BatchNorms × 5 entries, fc weight + bias
    shapes = {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
              "layer1.0.downsample.1.running_var": (256,), "layer2.0.conv2.weight": (128, 128, 3, 3),
              "layer3.5.bn3.num_batches_tracked": (), "layer4.2.conv3.weight": (2048, 512, 1, 1),
              "fc.weight": (1000, 2048), "fc.bias": (1000,)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert [k for k in state if k.startswith("layer2.0.")][:6] == [
        "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.bn1.bias", "layer2.0.bn1.running_mean",
        "layer2.0.bn1.running_var", "layer2.0.bn1.num_batches_tracked"]
    assert {k.split(".")[0] for k in state} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}


def test_load_weights(tmp_path):
    torch.manual_seed(0)
    source = tiny_resnet(3)
    wrapped = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    target = load_weights(tiny_resnet(3), wrapped)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(2\): fc.weight: file \(3, 128\), model \(5, 128\)"):
        load_weights(tiny_resnet(5), wrapped)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")} | {"head.w": torch.zeros(1)}, partial)
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): fc.weight, fc.bias[\s\S]*unexpected keys \(1\): head.w"):
        load_weights(tiny_resnet(3), partial)
    with pytest.raises(FileNotFoundError):
        load_weights(tiny_resnet(3), tmp_path / "missing.pt")
    assert isinstance(tiny_resnet(3), ResNet)


# ---------------------------------------------------------------------------- analyze.py end to end
def test_analyze_ekfac_query_rank(image_root, checkpoint, tmp_path, capsys):
    out = tmp_path / "ekfac"
    summary = analyze.main(_argv(image_root, out, checkpoint, "--factor_strategy", "ekfac", "--query_gradient_rank", "2",
                                 "--offload", "cpu"))
    scores, train_idx, query_idx = _scores(out)
    assert scores.shape == (6, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert train_idx.tolist() == list(range(24)) and query_idx.tolist() == list(range(6))
    assert summary["shape"] == [6, 24] and summary["proj_dim"] == 256
    top = json.loads((out / "topk.json").read_text())
    assert len(top) == 6 and len(top[0]["proponents"]) == 3
    assert top[0]["proponents"][0]["score"] == pytest.approx(float(scores[0].max()), rel=1e-5)
    assert sorted((out / "cache").glob("factors_tiny_ekfac_true_fp32/*.pt"))  # saved, resumable stages
    text = capsys.readouterr().out
    for needle in ("Profiler: stages", "Fit Factors", "Compute + Save Pairwise Score", "factors: stage: correction",
                   "scorer: precondition", "query cat/00.JPEG", "helps:"):
        assert needle in text


def test_analyze_sketched_on_disk_resumes(image_root, checkpoint, tmp_path, capsys):
    out = tmp_path / "sketched"
    # on CPU: CUDA's SJLT uses atomics, so a second run's query rows could differ in the last bit
    argv = _argv(image_root, out, checkpoint, "--device", "cpu", "--factor_strategy", "sketched", "--proj_type", "sjlt", "--offload", "disk",
                 "--num_train", "18", "--num_query", "4")
    summary = analyze.main(argv)
    scores, train_idx, query_idx = _scores(out)
    assert scores.shape == (4, 18) and np.isfinite(scores).all()
    assert len(set(train_idx.tolist())) == 18 and train_idx.max() < 24 and len(query_idx) == 4
    assert summary["damping"] > 0
    store = out / "cache" / "train_store_tiny_sjlt256_fp32.h5"
    with h5py.File(store) as f:
        assert f["main/rows"].shape == (18, 256) and f["main/written"][:].all()
    analyze.main(argv)  # second run reads the store instead of featurizing again
    np.testing.assert_array_equal(_scores(out)[0], scores)
    assert "Profiler: stages" in capsys.readouterr().out


def test_analyze_half_precision(image_root, checkpoint, tmp_path):
    full, half = tmp_path / "fp32", tmp_path / "bf16"
    common = ("--factor_strategy", "kfac", "--proj_type", "identity", "--offload", "none")
    analyze.main(_argv(image_root, full, checkpoint, *common))
    summary = analyze.main(_argv(image_root, half, checkpoint, *common, "--use_half_precision"))
    s32, s16 = _scores(full)[0], _scores(half)[0]
    assert s16.shape == s32.shape == (6, 24) and np.isfinite(s16).all()
    assert summary["args"]["use_half_precision"]
    rho = np.mean([scipy.stats.spearmanr(a, b)[0] for a, b in zip(s16, s32)])
    assert rho > 0.8, rho


def test_analyze_argument_errors(image_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze.main(["--dataset_dir", str(tmp_path / "none")])
    with pytest.raises(FileNotFoundError, match="has no train or val folder"):
        analyze.main(["--dataset_dir", str(image_root / "train")])
    with pytest.raises(SystemExit):
        analyze.parse_args(["--dataset_dir", "x", "--factor_strategy", "sketched", "--query_gradient_rank", "4"])
    with pytest.raises(SystemExit):
        analyze.parse_args(["--dataset_dir", "x", "--proj_type", "factorized", "--proj_dim", "200"])


def test_device_auto(monkeypatch):
    """--device defaults to auto: CUDA when torch sees a GPU, else the CPU; a named device is kept."""
    assert analyze.parse_args(["--dataset_dir", "x"]).device == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert analyze.parse_args(["--dataset_dir", "x"]).device == "cuda"
    assert analyze.parse_args(["--dataset_dir", "x", "--device", "auto"]).device == "cuda"
    assert analyze.parse_args(["--dataset_dir", "x", "--device", "cpu"]).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert analyze.parse_args(["--dataset_dir", "x"]).device == "cpu"


def test_query_batch_fits_the_memory_budget(capsys):
    """The factor strategies hold every query's full gradient and its preconditioned copy: the
    query batch is lowered to fit --memory_budget_gib (with a note), and a budget too small for one
    query (after the factors) is an error naming the ways out; 'sketched' is left alone."""
    model = tiny_resnet(3)
    layers = analyze.tracked_modules(model)
    d = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in layers)
    args = analyze.parse_args(["--dataset_dir", "x", "--query_batch_size", "100", "--device", "cpu"])
    per_query, resident = analyze.query_memory(model, layers, args)
    assert per_query == d * (2 * 4 + 2 * 4) and resident > 0  # float32 gradient + rows, float32 preconditioned copy + temporary
    args.memory_budget_gib = (resident + 10.5 * per_query) / 2**30
    assert analyze.fit_query_batch(args, model, layers) == 10
    assert "--query_batch_size 100 lowered to 10" in capsys.readouterr().out
    f64 = analyze.parse_args(["--dataset_dir", "x", "--factor_dtype", "float64", "--device", "cpu"])
    assert analyze.query_memory(model, layers, f64)[0] == d * (2 * 4 + 2 * 8) and analyze.query_memory(model, layers, f64)[1] == 2 * resident
    args.memory_budget_gib = resident / 2**30
    with pytest.raises(ValueError, match="do not fit the memory budget.*raise --memory_budget_gib, or use --factor_strategy sketched"):
        analyze.fit_query_batch(args, model, layers)
    args.memory_budget_gib = (resident + 10.5 * per_query) / 2**30
    assert analyze.fit_query_batch(args, model, layers, n_query=6) == 10 and capsys.readouterr().out == ""  # 6 queries fit anyway
    args.factor_strategy = "sketched"
    assert analyze.fit_query_batch(args, model, layers) == 100
    args.factor_strategy, args.memory_budget_gib = "ekfac", 1000.0
    assert analyze.fit_query_batch(args, model, layers) == 100 and capsys.readouterr().out == ""


def test_factor_stages_show_progress(capfd):
    """fit_factors' eigendecomposition (minutes for ResNet-50 on a CPU) has a bar naming the layer
    and its largest factor, like the data passes."""
    import sketchattr as sa

    torch.manual_seed(0)
    model = tiny_resnet(3).eval()
    data = (torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))
    sa.fit_factors(model, sa.ClassificationTask(), data, kind="kfac", modules=analyze.tracked_modules(model), batch_size=4)
    err = capfd.readouterr().err
    assert "covariance" in err and "eigendecomposition" in err and "18/18" in err and "fc (129×129)" in err
    sa.fit_factors(model, sa.ClassificationTask(), data, kind="kfac", modules=["fc"], batch_size=4, progress=False)
    assert "eigendecomposition" not in capfd.readouterr().err
