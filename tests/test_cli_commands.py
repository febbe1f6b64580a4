"""End to end: `sketchattr build` -> `score` -> `select` -> `validate` on tiny local files
(.npz, .pt, .csv, .jsonl, an image folder, Hugging Face BERT/GPT-2 folders), checked against the
library called directly on the same store; resuming a build; the errors a user sees."""
from __future__ import annotations

import json
import math
import sys

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import sketchattr as sa
from sketchattr.cli.main import main
from sketchattr.cli.config import CommandError
from sketchattr.bench.models.mlp import make_mlp
from sketchattr.score.selection import aggregate_scores
from sketchattr.validate import lds, subset_ground_truth

D, C, N = 6, 3, 40
MLP = ["--model", "sketchattr.bench.models.mlp:make_mlp", "--model_args", json.dumps({"in_dim": D, "hidden": 8, "out_dim": C})]
QUIET = ["--no_progress", "--device", "cpu"]


def arr(t) -> np.ndarray:
    """TopK fields / scores as numpy (tensors or arrays, whichever the library returns)."""
    return torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t).cpu().numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train .npz, query .pt, a checkpoint, and the model it holds."""
    root = tmp_path_factory.mktemp("mlp")
    g = np.random.RandomState(0)
    x, y = g.randn(N, D).astype(np.float32), g.randint(0, C, N)
    np.savez(root / "train.npz", x=x, y=y)
    xq, yq = g.randn(5, D).astype(np.float32), g.randint(0, C, 5)
    torch.save({"x": torch.from_numpy(xq), "y": torch.from_numpy(yq)}, root / "query.pt")
    model = make_mlp(in_dim=D, hidden=8, out_dim=C, seed=1).eval()
    torch.save(model.state_dict(), root / "ck.pt")
    return {"root": root, "x": x, "y": y, "xq": xq, "yq": yq, "model": model}


def build_mlp(files, store, *extra: str) -> list[str]:
    r = files["root"]
    return ["build", *MLP, "--checkpoint", str(r / "ck.pt"), "--task", "classification", "--train_data", str(r / "train.npz"),
            "--store", str(store), "--m", "32", *QUIET, *extra]


def featurizer(model, m=32, **kw) -> sa.Featurizer:
    return sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=m, seed=0, progress=False, **kw)


def test_mlp_build_score_select_validate(files, tmp_path, capsys):
    store = tmp_path / "out" / "store.h5"
    assert main(build_mlp(files, store)) == 0
    out = capsys.readouterr().out
    assert "wrote 40 new rows (0 were already there)" in out and str(store) in out and "store.run.json" in out
    spec = json.loads((tmp_path / "out" / "store.run.json").read_text())
    assert spec["m"] == 32 and spec["task"] == "classification" and spec["complete"] and spec["n_rows"] == N

    res = tmp_path / "res"
    assert main(["score", "--store", str(store), "--query_data", str(files["root"] / "query.pt"), "--k", "3",
                 "--output_dir", str(res), "--save_scores", *QUIET]) == 0
    printed = capsys.readouterr().out
    for name in ("topk.json", "topk.csv", "scores.h5", "report.html"):
        assert (res / name).stat().st_size > 0 and str(res / name) in printed
    # the same store scored by the library directly
    feat = featurizer(files["model"])
    disk = sa.DiskStore(store)
    scorer = sa.SketchedInfluence().fit(disk)
    qds = TensorDataset(torch.from_numpy(files["xq"]), torch.from_numpy(files["yq"]))
    top = scorer.top_k(feat.query_rows(qds), k=3)
    rep = json.loads((res / "topk.json").read_text())
    assert [r["query_index"] for r in rep["results"]] == list(range(5))
    for q, r in enumerate(rep["results"]):
        assert [p["train_index"] for p in r["proponents"]] == arr(top.proponents)[q].tolist()
        assert [p["train_index"] for p in r["opponents"]] == arr(top.opponents)[q].tolist()
        assert np.allclose([p["score"] for p in r["proponents"]], arr(top.proponent_scores)[q], rtol=1e-5)
        assert r["label"] == str(files["yq"][q]) and r["proponents"][0]["label"] == str(files["y"][r["proponents"][0]["train_index"]])
    assert rep["settings"]["damping"] == pytest.approx(scorer.damping_)
    lines = (res / "topk.csv").read_text().strip().splitlines()
    assert lines[0].startswith("query_index,") and len(lines) == 1 + 5 * 2 * 3
    with h5py.File(res / "scores.h5", "r") as f:
        full, cols = f["scores"][()], f["train_indices"][()]
    assert full.shape == (5, N) and np.allclose(full, arr(scorer.score(feat.query_rows(qds))), rtol=1e-5, atol=1e-5)
    assert "<table>" in (res / "report.html").read_text()

    # select: exactly ceil(p·n) rows, the top of the aggregated (max over targets) cosine scores
    sel = tmp_path / "sel" / "chosen.npy"
    assert main(["select", "--store", str(store), "--target_data", str(files["root"] / "query.pt"), "--fraction", "0.1",
                 "--output", str(sel), *QUIET]) == 0
    chosen = np.load(sel)
    assert len(chosen) == math.ceil(0.1 * N) == 4
    assert [int(v) for v in sel.with_suffix(".txt").read_text().split()] == chosen.tolist()
    agg = arr(aggregate_scores(torch.as_tensor(arr(sa.TracIn(feat, variant="cos").fit(disk).score(qds))), "max"))
    assert chosen.tolist() == arr(disk.indices)[np.argsort(-agg, kind="stable")[:4]].tolist()
    assert main(["select", "--store", str(store), "--target_data", str(files["root"] / "query.pt"), "--num_select", "5",
                 "--scorer", "sketched_influence", "--aggregate", "mean", "--output", str(tmp_path / "si"), *QUIET]) == 0
    agg = arr(scorer.score(feat.query_rows(qds))).mean(0)
    assert np.load(tmp_path / "si.npy").tolist() == arr(disk.indices)[np.argsort(-agg)[:5]].tolist()

    # validate: an HDF5 ground truth written by sketchattr.validate.ground_truth, and an .npz
    w = np.random.RandomState(3).randn(5, N)
    gt = subset_ground_truth(tmp_path / "gt.h5", lambda pos, seed: pos, lambda pos: w[:, pos].sum(1), n_train=N,
                             n_subsets=12, n_seeds=1, progress=False)
    capsys.readouterr()
    assert main(["validate", "--scores", str(res / "scores.h5"), "--ground_truth", str(tmp_path / "gt.h5"),
                 "--output", str(tmp_path / "lds.csv")]) == 0
    want = lds(full[:, np.argsort(cols)], gt.masks, gt.outputs)
    assert f"LDS {want.mean:.4f}" in capsys.readouterr().out
    per = np.loadtxt(tmp_path / "lds.csv", delimiter=",", skiprows=1)
    assert np.allclose(per[:, 1], want.per_query) and np.allclose(np.load(tmp_path / "lds.npy"), want.per_query)
    np.save(tmp_path / "s.npy", full)
    np.savez(tmp_path / "gt.npz", masks=gt.masks, outputs=gt.outputs + 0.5 * np.random.RandomState(4).randn(*gt.outputs.shape))
    assert main(["validate", "--scores", str(tmp_path / "s.npy"), "--ground_truth", str(tmp_path / "gt.npz")]) == 0
    with np.load(tmp_path / "gt.npz") as f:
        want = lds(full, f["masks"], f["outputs"])
    assert np.allclose(np.load(tmp_path / "s_lds.npy"), want.per_query, equal_nan=True)


def test_build_resumes_only_missing_rows(files, tmp_path, capsys):
    store = tmp_path / "store.h5"
    assert main(build_mlp(files, store, "--batch_size", "4", "--max_rows", "8")) == 0
    assert "wrote 8 new rows (0 were already there)" in capsys.readouterr().out
    assert len(sa.DiskStore(store)) == 8 and not json.loads((tmp_path / "store.run.json").read_text())["complete"]
    assert main(build_mlp(files, store, "--batch_size", "4")) == 0
    assert "wrote 32 new rows (8 were already there)" in capsys.readouterr().out
    assert main(build_mlp(files, store, "--batch_size", "4")) == 0
    assert "wrote 0 new rows (40 were already there)" in capsys.readouterr().out
    assert main(build_mlp(files, tmp_path / "fresh.h5", "--batch_size", "4")) == 0
    a, b = sa.DiskStore(store), sa.DiskStore(tmp_path / "fresh.h5")
    assert np.array_equal(arr(a.indices), np.arange(N)) and torch.equal(a.rows(), b.rows())


def test_ekfac_scorer_matches_library(files, tmp_path, capsys):
    store = tmp_path / "s.h5"
    assert main(build_mlp(files, store, "--projector", "identity", "--num_train", "30")) == 0
    assert main(["score", "--store", str(store), "--query_data", str(files["root"] / "query.pt"), "--scorer", "ekfac",
                 "--k", "2", "--report", "none", "--output_dir", str(tmp_path / "r"), *QUIET]) == 0
    assert "warning" not in capsys.readouterr().err  # EKFAC on exact rows: nothing to warn about
    feat = sa.Featurizer(files["model"], sa.ClassificationTask(), projector="identity", progress=False)
    train = TensorDataset(torch.from_numpy(files["x"][:30]), torch.from_numpy(files["y"][:30]))
    factors = sa.fit_factors(files["model"], sa.ClassificationTask(), train, kind="ekfac", modules=["0", "2"], progress=False)
    top = sa.EKFACScorer(factors, feat).fit(sa.DiskStore(store)).top_k(
        TensorDataset(torch.from_numpy(files["xq"]), torch.from_numpy(files["yq"])), k=2)
    rep = json.loads((tmp_path / "r" / "topk.json").read_text())
    assert [[p["train_index"] for p in r["proponents"]] for r in rep["results"]] == arr(top.proponents).tolist()
    assert not (tmp_path / "r" / "report.html").exists()


def test_less_selection_with_adam_state(files, tmp_path):
    """--optimizer_state: Adam-preconditioned train rows (LESS); select = top of max-over-targets cosine."""
    model = make_mlp(in_dim=D, hidden=8, out_dim=C, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sa.ClassificationTask().train_loss(model, (torch.from_numpy(files["x"]), torch.from_numpy(files["y"]))).backward()
    opt.step()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    torch.save({"optimizer": opt.state_dict()}, tmp_path / "opt.pt")
    store = tmp_path / "less.h5"
    assert main(["build", *MLP, "--checkpoint", str(tmp_path / "ck.pt"), "--optimizer_state", str(tmp_path / "opt.pt"),
                 "--task", "classification", "--train_data", str(files["root"] / "train.npz"), "--store", str(store),
                 "--m", "32", *QUIET]) == 0
    assert main(["select", "--store", str(store), "--target_data", str(files["root"] / "query.pt"), "--fraction", "0.25",
                 "--output", str(tmp_path / "less.txt"), *QUIET]) == 0
    feat = featurizer(model.eval(), preconditioner=sa.AdamPreconditioner.from_state_dict(opt.state_dict(), model))
    disk = sa.DiskStore(store)
    scores = arr(sa.TracIn(feat, variant="cos").fit(disk).score(TensorDataset(torch.from_numpy(files["xq"]), torch.from_numpy(files["yq"]))))
    want = arr(disk.indices)[np.argsort(-scores.max(0))[:10]]
    assert np.load(tmp_path / "less.npy").tolist() == want.tolist()
    assert [int(v) for v in (tmp_path / "less.txt").read_text().split()] == want.tolist()


def test_records_config_files_and_regression(files, tmp_path):
    """CSV (numeric, regression) and JSONL (string class labels) through --config (YAML, TOML sections); flags win."""
    x, y = files["x"], files["y"]
    names = np.array(["bird", "cat", "dog"])
    cols = [f"f{j}" for j in range(D)]
    (tmp_path / "train.csv").write_text(",".join(cols + ["target"]) + "\n" + "".join(
        ",".join(f"{v:.6f}" for v in row) + f",{t:.3f}\n" for row, t in zip(x, x.sum(1))))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**dict(zip(cols, map(float, row))), "label": str(names[c])}) + "\n"
                                                   for row, c in zip(x, y)))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({**dict(zip(cols, map(float, row))), "label": "dog"}) + "\n" for row in x[:3]))
    (tmp_path / "reg.yaml").write_text(
        f"model: sketchattr.bench.models.mlp:make_mlp\nmodel_args: {{in_dim: {D}, hidden: 8, out_dim: 1}}\ntask: regression\n"
        f"train_data: {tmp_path / 'train.csv'}\nlabel_column: target\nstore: {tmp_path / 'reg.h5'}\nm: 16\nno_progress: true\n"
        "random_init: true\n")
    assert main(["build", "--config", str(tmp_path / "reg.yaml"), "--m", "8"]) == 0  # the flag beats the file
    assert sa.DiskStore(tmp_path / "reg.h5").dim == 8
    assert main(["query", "--store", str(tmp_path / "reg.h5"), "--query_data", str(tmp_path / "train.csv"), "--num_query", "2",
                 "--k", "2", "--report", "html", "--output_dir", str(tmp_path / "reg")]) == 0
    assert len(json.loads((tmp_path / "reg" / "topk.json").read_text())["results"]) == 2

    (tmp_path / "pipe.toml").write_text(
        f'model = "sketchattr.bench.models.mlp:make_mlp"\nmodel_args = \'{{"in_dim": {D}, "hidden": 8, "out_dim": 3}}\'\n'
        f'store = "{tmp_path / "cls.h5"}"\nno_progress = true\n'
        f'[build]\nrandom_init = true\ntask = "classification"\ntrain_data = "{tmp_path / "train.jsonl"}"\nprojector = "gaussian"\nm = 12\n'
        f'modules = ["2"]\n[score]\nquery_data = "{tmp_path / "q.jsonl"}"\nk = 3\noutput_dir = "{tmp_path / "cls"}"\n')
    assert main(["build", "--config", str(tmp_path / "pipe.toml")]) == 0
    spec = json.loads((tmp_path / "cls.run.json").read_text())
    assert spec["data"]["classes"] == ["bird", "cat", "dog"] and spec["modules"] == ["2"] and spec["projector"] == "gaussian"
    assert main(["score", "--config", str(tmp_path / "pipe.toml")]) == 0
    rep = json.loads((tmp_path / "cls" / "topk.json").read_text())
    assert rep["results"][0]["label"] == "dog" and {p["label"] for r in rep["results"] for p in r["proponents"]} <= set(names)
    assert rep["settings"]["modules"] == ["2"] and "dog" in (tmp_path / "cls" / "report.html").read_text()


def test_image_folder_and_model_file(tmp_path):
    from PIL import Image

    g = np.random.RandomState(0)
    for split, n in (("train", 3), ("query", 1)):
        for c, cls in enumerate(("ants", "bees")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                px = np.clip(g.randint(0, 120, (10, 10, 3)) + 120 * c, 0, 255).astype(np.uint8)
                Image.fromarray(px).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make_net(size=8):\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 2))\n")
    store = tmp_path / "img.h5"
    assert main(["build", "--model", f"{tmp_path / 'net.py'}:make_net", "--random_init", "--task", "classification", "--image_size", "8",
                 "--train_data", str(tmp_path / "train"), "--store", str(store), "--m", "16", *QUIET]) == 0
    assert len(sa.DiskStore(store)) == 6
    assert main(["score", "--store", str(store), "--query_data", str(tmp_path / "query"), "--k", "2", "--report", "both",
                 "--output_dir", str(tmp_path / "r"), *QUIET]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 * (1 + 2 + 2) and "bees" in html
    assert (tmp_path / "r" / "report.png").stat().st_size > 1000


def hf_folder(tmp_path, kind: str):
    """A tiny BERT classifier or GPT-2 LM saved with a WordLevel tokenizer (no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + "the a cat dog sat ran on mat fast slow red big".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=2))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(words), n_positions=32, n_embd=16,
                                                                     n_layer=1, n_head=2))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, fast, model.eval()


TEXTS = ["the cat sat on the mat", "a dog ran fast", "the red dog sat", "a big cat ran on a mat", "the slow cat",
         "a fast red dog ran on the mat", "big dog", "the cat ran slow"]


def test_hf_bert_text_classification(tmp_path):
    folder, tok, model = hf_folder(tmp_path, "bert")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    (tmp_path / "q.csv").write_text("text,label\nthe dog sat on the mat,1\na cat,0\n")
    store = tmp_path / "bert.h5"
    assert main(["build", "--model", str(folder), "--task", "sequence_classification", "--train_data", str(tmp_path / "train.jsonl"),
                 "--store", str(store), "--modules", "linear", "--m", "64", "--batch_size", "3", *QUIET]) == 0
    assert main(["score", "--store", str(store), "--query_data", str(tmp_path / "q.csv"), "--k", "3",
                 "--output_dir", str(tmp_path / "r"), *QUIET]) == 0
    rows = lambda texts, labels: [{**{k: torch.tensor(v) for k, v in tok(t).items()}, "labels": torch.tensor(y)} for t, y in zip(texts, labels)]
    feat = sa.Featurizer(model, sa.SequenceClassificationTask(), modules="linear", projector="sjlt", m=64, batch_size=3,
                         collate_fn=sa.PadCollator(pad_token_id=0), progress=False)
    top = sa.SketchedInfluence().fit(sa.DiskStore(store)).top_k(feat.query_rows(rows(["the dog sat on the mat", "a cat"], [1, 0])), k=3)
    rep = json.loads((tmp_path / "r" / "topk.json").read_text())
    assert [[p["train_index"] for p in r["proponents"]] for r in rep["results"]] == arr(top.proponents).tolist()
    assert "the dog sat on the mat" in (tmp_path / "r" / "report.html").read_text()


def test_hf_gpt2_causal_lm(tmp_path):
    folder, _, _ = hf_folder(tmp_path, "gpt2")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    store = tmp_path / "lm.h5"
    assert main(["build", "--model", str(folder), "--task", "causal_lm", "--train_data", str(tmp_path / "train.jsonl"),
                 "--store", str(store), "--modules", "*.mlp.*", "--m", "32", *QUIET]) == 0
    assert main(["score", "--store", str(store), "--query_data", str(tmp_path / "train.jsonl"), "--query_indices", "0", "5",
                 "--k", "2", "--output_dir", str(tmp_path / "r"), *QUIET]) == 0
    rep = json.loads((tmp_path / "r" / "topk.json").read_text())
    assert [r["query_index"] for r in rep["results"]] == [0, 5] and rep["results"][0]["proponents"][0]["train_index"] == 0
    assert main(["select", "--store", str(store), "--target_data", str(tmp_path / "train.jsonl"), "--target_indices", "1",
                 "--num_select", "3", "--output", str(tmp_path / "sel.npy"), *QUIET]) == 0
    assert len(np.load(tmp_path / "sel.npy")) == 3


def test_user_errors_are_one_clear_line(files, tmp_path, capsys):
    r = files["root"]
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "text.csv").write_text("text,label\nhello,0\n")
    (tmp_path / "data.txt").write_text("1 2 3\n")
    (tmp_path / "hfds").mkdir()
    (tmp_path / "hfds" / "state.json").write_text("{}")
    (tmp_path / "bad.yaml").write_text("modell: x\n")
    base = lambda data, *extra: ["build", *MLP, "--task", "classification", "--train_data", str(data),
                                 "--store", str(tmp_path / "e.h5"), "--checkpoint", str(r / "ck.pt"), *QUIET, *extra]
    cases = [
        (base(tmp_path / "missing.npz"), "data not found"),
        (base(tmp_path / "data.txt"), "unknown data extension '.txt'"),
        (base(tmp_path / "nolabel.csv"), "no label column"),
        (base(r / "train.npz", "--label_column", "nope"), "label column 'nope' not found"),
        (base(tmp_path / "text.csv"), "needs a Hugging Face tokenizer"),
        (base(r / "train.npz", "--checkpoint", str(tmp_path / "nock.pt")), "--checkpoint not found"),
        (["build", "--model", "no_such_pkg.models:net", "--random_init", "--task", "classification", "--train_data",
          str(r / "train.npz"), "--store", str(tmp_path / "e.h5")], "cannot import 'no_such_pkg.models'"),
        (["build", "--model", "sketchattr.bench.models.mlp:nope", "--random_init", "--task", "classification", "--train_data",
          str(r / "train.npz"), "--store", str(tmp_path / "e.h5")], "has no attribute 'nope'"),
        (["build", *MLP, "--task", "classification", "--train_data", str(r / "train.npz")], "needs --store"),
        (["build", "--config", str(tmp_path / "bad.yaml")], "unknown key(s) ['modell']"),
        (["score", "--store", str(tmp_path / "none.h5"), "--query_data", str(r / "query.pt")], "store not found"),
        (["validate", "--scores", str(tmp_path / "x.npy"), "--ground_truth", str(tmp_path / "g.npz")], "--scores file not found"),
    ]
    try:
        import datasets  # noqa: F401
    except ImportError:
        cases.append((base(tmp_path / "hfds"), "needs the datasets package"))
    mlp_other = make_mlp(in_dim=D, hidden=9, out_dim=C)
    torch.save(mlp_other.state_dict(), tmp_path / "other.pt")
    cases.append((base(r / "train.npz", "--checkpoint", str(tmp_path / "other.pt")), "does not fit the model"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("error:") == 1, (message, err)

    # a store whose checkpoint changed since build; a bad fraction; queries that do not match the ground truth
    store = tmp_path / "s.h5"
    ck = tmp_path / "ck.pt"
    torch.save(files["model"].state_dict(), ck)
    assert main(["build", *MLP, "--checkpoint", str(ck), "--task", "classification", "--train_data", str(r / "train.npz"),
                 "--store", str(store), "--m", "8", *QUIET]) == 0
    assert main(["select", "--store", str(store), "--target_data", str(r / "query.pt"), "--fraction", "1.5", *QUIET]) == 2
    assert "--fraction must be in (0, 1]" in capsys.readouterr().err
    np.save(tmp_path / "s.npy", np.zeros((4, N)))
    np.savez(tmp_path / "g.npz", masks=np.random.RandomState(0).rand(5, N) < 0.5, outputs=np.zeros((5, 3)))
    assert main(["validate", "--scores", str(tmp_path / "s.npy"), "--ground_truth", str(tmp_path / "g.npz")]) == 2
    assert "4 queries but the ground truth measures 3" in capsys.readouterr().err
    torch.save(make_mlp(in_dim=D, hidden=8, out_dim=C, seed=5).state_dict(), ck)
    assert main(["score", "--store", str(store), "--query_data", str(r / "query.pt"), *QUIET]) == 2
    assert "does not match the model of its run spec" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the CLI never answers wrong silently
NAMES = ["dog", "cat", "bird"]
"""Class names in the fixture model's id order (dog=0, cat=1, bird=2): not the alphabetical order."""


def write_csv(path, x, labels) -> str:
    """Feature columns f0.. (exact float32 values) and a label column."""
    cols = [f"f{j}" for j in range(x.shape[1])]
    path.write_text(",".join(cols + ["label"]) + "\n" + "".join(
        ",".join(repr(float(v)) for v in row) + f",{lab}\n" for row, lab in zip(x, labels)))
    return str(path)


def score_argv(store, query, out, *extra: str) -> list[str]:
    return ["score", "--store", str(store), "--query_data", str(query), "--k", "3", "--report", "none",
            "--output_dir", str(out), *QUIET, *extra]


def proponents(out) -> list[list[int]]:
    return [[p["train_index"] for p in r["proponents"]] for r in json.loads((out / "topk.json").read_text())["results"]]


@pytest.fixture(scope="module")
def label_stores(files, tmp_path_factory):
    """A store built from the .npz (integer ids) and one from a CSV with string labels and --classes."""
    root = tmp_path_factory.mktemp("labels")
    train_csv = write_csv(root / "train.csv", files["x"], [NAMES[c] for c in files["y"]])
    write_csv(root / "q.csv", files["xq"], [NAMES[c] for c in files["yq"]])
    write_csv(root / "fish.csv", files["xq"], ["fish"] * len(files["xq"]))
    assert main(build_mlp(files, root / "npz.h5")) == 0
    r = files["root"]
    assert main(["build", *MLP, "--checkpoint", str(r / "ck.pt"), "--task", "classification", "--train_data", train_csv,
                 "--store", str(root / "csv.h5"), "--m", "32", "--classes", *NAMES, *QUIET]) == 0
    return root


def test_label_mapping_is_printed_stored_and_used(files, label_stores, tmp_path, capsys):
    """Build prints the mapping (sorted names by default); --classes sets it; query files get the stored one."""
    root, r = label_stores, files["root"]
    assert main(["build", *MLP, "--checkpoint", str(r / "ck.pt"), "--task", "classification", "--train_data",
                 str(root / "train.csv"), "--store", str(tmp_path / "sorted.h5"), "--m", "32", *QUIET]) == 0
    assert "labels: bird=0, cat=1, dog=2 (from sorted label names of train.csv; override with --classes)" in capsys.readouterr().out
    assert main(build_mlp(files, tmp_path / "ids.h5")) == 0
    assert "labels: integer class ids 0..2 as stored in train.npz (3 distinct; name them with --classes)" in capsys.readouterr().out
    spec = json.loads((root / "csv.run.json").read_text())
    assert spec["data"]["classes"] == NAMES and spec["data"]["classes_source"] == "--classes"
    # --classes gave the model's ids: the CSV store's rows are the .npz store's, and so are the query scores
    assert np.allclose(sa.DiskStore(root / "csv.h5").rows().numpy(), sa.DiskStore(root / "npz.h5").rows().numpy(), atol=1e-6)
    assert main(score_argv(root / "csv.h5", root / "q.csv", tmp_path / "a")) == 0
    assert main(score_argv(root / "npz.h5", r / "query.pt", tmp_path / "b")) == 0
    assert proponents(tmp_path / "a") == proponents(tmp_path / "b")
    rep = json.loads((tmp_path / "a" / "topk.json").read_text())
    assert [x["label"] for x in rep["results"]] == [NAMES[c] for c in files["yq"]]


def test_label_mismatches_are_refused(files, label_stores, tmp_path, capsys):
    root = label_stores
    cases = [
        (score_argv(root / "csv.h5", root / "fish.csv", tmp_path / "o"), "labels ['fish'] are not among the classes"),
        (score_argv(root / "csv.h5", root / "q.csv", tmp_path / "o", "--classes", "bird", "cat", "dog"),
         "--classes bird cat dog differs from the store's label mapping dog=0, cat=1, bird=2 (from --classes)"),
        (score_argv(root / "npz.h5", root / "q.csv", tmp_path / "o"), "the training labels were integer class ids with no names: "
         "give the class names in class-id order with --classes"),
        (["select", "--store", str(root / "npz.h5"), "--target_data", str(root / "q.csv"), "--num_select", "2", *QUIET],
         "give the class names in class-id order with --classes"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, (message, err)
    # naming the ids of an integer-label store makes its string-label queries usable; the stored mapping may be restated
    assert main(score_argv(root / "npz.h5", root / "q.csv", tmp_path / "c", "--classes", *NAMES)) == 0
    assert proponents(tmp_path / "c") == proponents_of_query_pt(files, root, tmp_path / "d")
    assert main(score_argv(root / "csv.h5", root / "q.csv", tmp_path / "e", "--classes", *NAMES)) == 0


def proponents_of_query_pt(files, root, out) -> list[list[int]]:
    assert main(score_argv(root / "npz.h5", files["root"] / "query.pt", out)) == 0
    return proponents(out)


def test_build_needs_weights_or_random_init(files, tmp_path, capsys):
    (tmp_path / "lin.py").write_text("from torch import nn\n\ndef make_net():\n    return nn.Sequential(nn.Linear(6, 3))\n")
    argv = ["build", "--model", f"{tmp_path / 'lin.py'}:make_net", "--task", "classification", "--train_data",
            str(files["root"] / "train.npz"), "--store", str(tmp_path / "s.h5"), "--m", "32", *QUIET]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "--random_init" in err and err.count("error:") == 1
    assert main(argv + ["--random_init", "--checkpoint", str(files["root"] / "ck.pt")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(argv + ["--random_init"]) == 0
    assert "[random initial weights: --random_init, seed 0]" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.run.json").read_text())["init_seed"] == 0
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    want = featurizer(model).featurize(TensorDataset(torch.from_numpy(files["x"]), torch.from_numpy(files["y"])))
    assert torch.allclose(sa.DiskStore(tmp_path / "s.h5").rows(), want.rows(), atol=1e-6)
    # score rebuilds the same seeded weights: the store matches its model
    assert main(score_argv(tmp_path / "s.h5", files["root"] / "query.pt", tmp_path / "r")) == 0


def test_build_prints_model_quality(files, tmp_path, capsys, monkeypatch):
    x, y = torch.from_numpy(files["x"]), torch.from_numpy(files["y"])
    with torch.no_grad():
        logits = files["model"](x)
    acc, ce = 100 * float((logits.argmax(1) == y).float().mean()), float(torch.nn.functional.cross_entropy(logits, y))
    assert main(build_mlp(files, tmp_path / "a.h5")) == 0
    assert (f"model quality: accuracy {acc:.1f}% (chance 33.3%), mean cross-entropy {ce:.4g} on all 40 training rows "
            "(one pass, no gradients)") in capsys.readouterr().out
    import sketchattr.cli.fit_checks as fit_checks

    monkeypatch.setattr(fit_checks, "EVAL_ROWS", 25)
    reg = make_mlp(in_dim=D, hidden=8, out_dim=1, seed=2)
    torch.save(reg.state_dict(), tmp_path / "reg.pt")
    with torch.no_grad():
        mse = float(0.5 * ((reg(x[:25])[:, 0] - y[:25].float()) ** 2).mean())
    assert main(["build", "--model", "sketchattr.bench.models.mlp:make_mlp", "--model_args", f"in_dim={D},hidden=8,out_dim=1",
                 "--checkpoint", str(tmp_path / "reg.pt"), "--task", "regression", "--train_data",
                 str(files["root"] / "train.npz"), "--store", str(tmp_path / "r.h5"), "--m", "8", *QUIET]) == 0
    assert f"model quality: mean loss {mse:.4g} (1/2 squared error per row) on the first 25 of 40 training rows" in capsys.readouterr().out


def test_data_that_does_not_fit_the_model_is_one_clear_line(files, tmp_path, capsys):
    from PIL import Image

    r = files["root"]
    assert main(build_mlp(files, tmp_path / "s.h5")) == 0
    torch.save({"x": torch.randn(3, 5), "y": torch.tensor([0, 1, 2])}, tmp_path / "q5.pt")
    np.savez(tmp_path / "four.npz", x=files["x"], y=np.arange(N) % 4)
    for c in ("ants", "bees"):
        (tmp_path / "img" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "img" / c / "0.png")
    (tmp_path / "img_net.py").write_text("from torch import nn\n\ndef make_net():\n"
                                         "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))\n")
    cases = [
        (score_argv(tmp_path / "s.h5", tmp_path / "q5.pt", tmp_path / "o"),
         "--query_data q5.pt does not fit the model: layer '0' (Linear) expects 6 input features (last dimension), got 5"),
        (["select", "--store", str(tmp_path / "s.h5"), "--target_data", str(tmp_path / "q5.pt"), "--num_select", "2", *QUIET],
         "--target_data q5.pt does not fit the model: layer '0' (Linear) expects 6 input features"),
        (["build", *MLP, "--checkpoint", str(r / "ck.pt"), "--task", "classification", "--train_data", str(tmp_path / "four.npz"),
          "--store", str(tmp_path / "f.h5"), *QUIET], "the model outputs 3 classes (ids 0..2) but --train_data four.npz has "
                                                      "class ids up to 3"),
        (["build", "--model", f"{tmp_path / 'img_net.py'}:make_net", "--random_init", "--task", "classification",
          "--image_size", "10", "--train_data", str(tmp_path / "img"), "--store", str(tmp_path / "i.h5"), *QUIET],
         "layer '1' (Linear) expects 192 input features (last dimension), got 300"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("error:") == 1, (message, err)
    assert "rows have shape [3, 10, 10] (--image_size sets the image size)" in err


def test_score_from_another_working_directory(files, tmp_path, monkeypatch, capsys):
    """An import-path model found from the build's folder is found again from anywhere (the spec records where)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "cwd_only_models.py").write_text("from sketchattr.bench.models.mlp import make_mlp\n\ndef net(**kw):\n"
                                             "    return make_mlp(**kw)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(code)
    r = files["root"]
    assert main(["build", "--model", "cwd_only_models:net", *MLP[2:], "--checkpoint", str(r / "ck.pt"), "--task",
                 "classification", "--train_data", str(r / "train.npz"), "--store", str(tmp_path / "s.h5"), "--m", "8", *QUIET]) == 0
    sys.path[:] = [p for p in sys.path if p not in ("", str(code))]
    monkeypatch.delitem(sys.modules, "cwd_only_models")
    monkeypatch.chdir(tmp_path)
    assert main(score_argv(tmp_path / "s.h5", r / "query.pt", tmp_path / "o")) == 0
    assert main(["select", "--store", str(tmp_path / "s.h5"), "--target_data", str(r / "query.pt"), "--num_select", "2",
                 "--output", str(tmp_path / "sel.npy"), *QUIET]) == 0
    spec = json.loads((tmp_path / "s.run.json").read_text())
    assert spec["model_path"] == str(code) and spec["model_file"] == str(code / "cwd_only_models.py")


def test_flags_in_errors_traceback_anywhere_and_suggestions(files, tmp_path, capsys):
    store = tmp_path / "s.h5"
    assert main(build_mlp(files, store)) == 0
    assert main(build_mlp(files, store, "--m", "16")) == 2  # other settings on an existing store
    err = capsys.readouterr().err
    assert "pass --overwrite to discard" in err and "overwrite=True" not in err
    missing = ["score", "--store", str(tmp_path / "none.h5"), "--query_data", str(files["root"] / "query.pt")]
    for argv in (["--traceback", *missing], [*missing, "--traceback"]):
        with pytest.raises(CommandError, match="store not found"):
            main(argv)
    with pytest.raises(SystemExit) as exit_:
        main(build_mlp(files, store, "--projecter", "gaussian"))
    assert exit_.value.code == 2
    assert "error: unrecognized argument --projecter; did you mean --projector?" in capsys.readouterr().err


def test_ekfac_on_a_random_sketch_warns(files, tmp_path, capsys):
    assert main(build_mlp(files, tmp_path / "s.h5", "--m", "16")) == 0
    capsys.readouterr()
    assert main(score_argv(tmp_path / "s.h5", files["root"] / "query.pt", tmp_path / "o", "--scorer", "ekfac")) == 0
    err = capsys.readouterr().err
    assert "warning: --scorer ekfac on a store sketched with a random projector (sjlt, m=16) loses most of EKFAC's accuracy" in err
    assert "--scorer sketched_influence" in err and "--projector identity" in err


def test_an_empty_checkpoint_file_is_one_clear_error(tmp_path):
    """torch.load of an empty file raises with no message: still one error naming the flag and file."""
    from torch import nn

    from sketchattr.cli.model_loading import read_state_dict

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CommandError, match=r"cannot read --checkpoint .*empty\.pt .*EOFError"):
        read_state_dict(str(empty), nn.Linear(2, 2))
