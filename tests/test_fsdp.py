"""Models larger than one device: a tiny HF GPT-2 (tied embeddings, attention mask) and Llama wrapped
with ``fully_shard`` per block and at the root (``reshard_after_forward`` True and False), and GPT-2
under DistributedDataParallel, on 2 gloo ranks (tests/fsdp_worker.py). Every stage — sharded
featurize with every projector, EKFAC factors, EKFAC and sketched-influence scores, the sparse
eigenbasis store, TracIn over two checkpoints, the train-time sketcher — must give what the same
unsharded model gives in one process (float64)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker as worker  # noqa: E402
from launcher import run_ranks  # noqa: E402
from padded_lm import PaddedLMTask, tiny_hf  # noqa: E402

import sketchattr as sa  # noqa: E402

pytest.importorskip("transformers")  # a dev dependency: installed in CI
RUNS = {"gpt2": ["fsdp", "fsdp_keep", "ddp", "refusals"], "llama": ["fsdp", "fsdp_keep"]}
"""Per model, the wrappings one 2-rank launch runs (each launch costs a few seconds of start-up)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank run of each model's wrappings (launched once, on first use)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"fsdp_{name}")
            run_ranks([str(Path(worker.__file__)), name, ",".join(RUNS[name]), str(out)], world=2, timeout=300)
            done[name] = out
        return done[name]

    return get


CONFIGS = [(name, w) for name, ws in RUNS.items() for w in ws if w != "refusals"]


@pytest.mark.parametrize("name, wrapping", CONFIGS, ids=[f"{n}-{w}" for n, w in CONFIGS])
def test_every_stage_on_a_wrapped_model_equals_the_unsharded_model(name, wrapping, runs):
    """Stores (joined from the ranks' shards) equal a one-process featurization of the unsharded model;
    factors and scores equal those of the unsharded model fitted on the same two ranks (the same
    all-reduced sums: EKFAC's eigenbases of repeated eigenvalues are not defined by the data alone,
    so sums added in another order may pick other ones); train-time rows equal the featurizer's."""
    out = runs(name)
    train, _ = worker.data()
    task = PaddedLMTask()
    for key, (projector, m) in worker.PROJECTORS.items():
        store = sa.DiskStore(out / wrapping / f"{key}.h5")
        feat = sa.Featurizer(tiny_hf(name), task, projector=projector, m=m, seed=0, batch_size=worker.BATCH, progress=False)
        assert list(store.indices) == list(range(len(train))), key
        assert torch.allclose(store.rows(), feat.train_rows(train).float(), rtol=1e-6, atol=1e-9), key  # float32 storage
    for r in range(2):
        res = torch.load(out / wrapping / f"rank{r}.pt", weights_only=True)
        plain = torch.load(out / "plain" / f"rank{r}.pt", weights_only=True)
        assert len(plain) > 20
        for key, value in plain.items():
            assert torch.allclose(res[key], value, rtol=1e-9, atol=1e-12), (r, key)
        own = train[r * worker.BATCH:(r + 1) * worker.BATCH]
        feat = sa.Featurizer(tiny_hf(name), task, projector="sjlt", m=32, seed=0, progress=False)
        assert torch.allclose(res["train_time"], feat.train_rows(own), rtol=1e-8, atol=1e-11), r


def test_what_cannot_work_is_refused_naming_the_fix_and_mixed_wrapping_works(runs):
    import json

    tmp_path = runs("gpt2") / "refusals"
    train, _ = worker.data()
    for r in range(2):
        found = json.loads((tmp_path / f"refusals{r}.json").read_text())
        kind, text = found["dtype"]
        assert kind == "ShardedModelError" and "before fully_shard" in text
        kind, text = found["no_rule"]
        assert kind == "ShardedModelError" and "hook engine" in text and "select modules" in text
        kind, text = found["tensor_parallel"]
        assert kind == "ShardedModelError" and "tensor" in text and "fully_shard" in text
        kind, text = found["ggn_products"]  # RefinedInfluence's G products need whole parameters
        assert kind == "ShardedModelError" and "FSDP2-sharded model is not supported" in text and "EKFAC" in text
        rows = torch.load(tmp_path / f"mixed{r}.pt", weights_only=True)["rows"]
        feat = sa.Featurizer(tiny_hf("gpt2"), PaddedLMTask(), projector="sjlt", m=32, seed=0, progress=False)
        assert torch.allclose(rows, feat.train_rows(train[r::2]), rtol=1e-9, atol=1e-12)


def test_model_times_data_parallel_joined_store_is_bit_identical(tmp_path):
    """4 ranks on a 2 × 2 device mesh (HSDP: sharded within each pair, replicated across): each rank
    writes its own rows into its rank-shard file; the joined store equals a one-process store."""
    run_ranks([str(Path(worker.__file__)), "gpt2", "hsdp", str(tmp_path)], world=4, timeout=300)
    tmp_path = tmp_path / "hsdp"
    train, _ = worker.data()
    for key in ("identity", "sjlt"):
        projector, m = worker.PROJECTORS[key]
        feat = sa.Featurizer(tiny_hf("gpt2"), PaddedLMTask(), projector=projector, m=m, seed=0, batch_size=worker.BATCH,
                             progress=False)
        one = feat.featurize(train, store="disk", path=tmp_path / f"one_{key}.h5")
        joined = sa.DiskStore(tmp_path / f"{key}.h5")
        assert sorted(joined.indices.tolist()) == list(range(len(train)))
        assert torch.equal(torch.as_tensor(joined.indices), torch.as_tensor(one.indices)), key
        assert torch.equal(joined.rows(), one.rows()), key


def test_two_nodes_shared_or_local_disk(tmp_path):
    """Multi-node as README's recipe, two torchrun launches (``--nnodes 2 --nproc_per_node 1``, node
    ranks 0 and 1, one rendezvous): a shared folder (rank 0 joins), and each node's own folder (shards
    copied together afterwards, then join_store). Each store equals a one-process store."""
    import os
    import shutil
    import subprocess

    import sketchattr.distributed as sad
    from launcher import ROOT, free_port

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    port, procs = free_port(), []
    for node, node_dir in enumerate(nodes):
        node_dir.mkdir()
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NODE_DIR=str(node_dir))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(Path(__file__).parent / "multinode_worker.py"), str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for node, p in enumerate(procs):
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, f"node {node} failed:\n{out[-4000:]}"
    local = tmp_path / "local"
    local.mkdir()
    for d in nodes:
        for shard in d.glob("store.rank*-of-2.h5"):
            shutil.copy(shard, local / shard.name)
    sad.join_store(local / "store.h5", 2)
    train, queries = worker.data()
    feat = sa.Featurizer(tiny_hf("gpt2"), PaddedLMTask(), projector="sjlt", m=32, seed=0, batch_size=worker.BATCH,
                         progress=False)
    one = feat.featurize(train, store="disk", path=tmp_path / "one.h5")
    ref = sa.SketchedInfluence().fit(one).score(feat.query_rows(queries))
    for joined, scores in ((tmp_path / "shared" / "store.h5", tmp_path / "shared" / "scores.pt"),
                           (local / "store.h5", nodes[0] / "scores.pt")):
        store = sa.DiskStore(joined)
        assert torch.equal(store.rows(), one.rows()) and list(store.indices) == list(one.indices), joined
        got = torch.load(scores, weights_only=True)["scores"]
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max())), joined  # float32 rows


def test_hf_trainer_callback_on_two_ranks(tmp_path):
    """The Trainer's own 2-rank loop (DDP on CPU; its FSDP needs an accelerator, and the sketcher's
    FSDP path is the custom loop's above): each rank's first captured step holds its own examples'
    exact rows at the initial weights."""
    run_ranks([str(Path(__file__).parent / "trainer_worker.py"), str(tmp_path)], world=2, timeout=300)
    import transformers as tf

    from padded_lm import padded_tokens

    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    model.load_state_dict(torch.load(tmp_path / "initial.pt", weights_only=True))
    data = padded_tokens(8, 16, seed=1)
    feat = sa.Featurizer(model, sa.CausalLMTask(), projector="sjlt", m=32, seed=0, progress=False)
    seen = []
    for r in range(2):
        got = torch.load(tmp_path / f"trainer{r}.pt", weights_only=True)
        idx = got["indices"].tolist()
        seen += idx
        assert len(idx) == 2
        assert torch.allclose(got["rows"], feat.train_rows(data, indices=idx), rtol=1e-3, atol=1e-5)  # float32
    assert len(set(seen)) == 4  # the ranks saw different examples
