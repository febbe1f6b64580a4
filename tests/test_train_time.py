"""Train-time stores: rows captured from a training step's own forward and backward (float64)
equal the projector applied to per-example autograd gradients at the step's parameters (before
its update) and a Featurizer's rows there; the HF Trainer callback end to end; groups, indices,
resume, refusals."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sketchattr as sa
from sketchattr.featurize.loss_scale import example_scales
from sketchattr.featurize.train_time import IndexedDataset, StepSchedule, TrainTimeSketcher
from padded_lm import autograd_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU several threads spin-wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def mlp_data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=48, n_positions=24, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).double()


def token_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in torch.randint(4, 12, (n,), generator=g).tolist():
        ids = torch.randint(3, 48, (k,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def snapshot(model, build):
    """A copy of ``model``'s current parameters in a fresh model from ``build`` (eval mode; the
    trained model carries hooks, which deepcopy cannot copy)."""
    copy_ = build()
    copy_.load_state_dict(copy.deepcopy(model.state_dict()))
    return copy_.eval()


def per_example_rows(model, task, examples, sel, projector):
    """The projector applied to explicit per-example gradients (autograd on each example alone)."""
    names = [p for group in sel.param_names for p in group]
    grads = autograd_rows(model, task, examples, names=names)
    return projector.project(list(torch.split(grads, list(sel.dims), dim=1)))


def test_mlp_custom_loop_rows_are_exact_at_the_steps_parameters():
    model, (x, y) = mlp(), mlp_data()
    task = sa.ClassificationTask()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sketcher = TrainTimeSketcher(model, task, projector="identity")
    snaps, order = [], [torch.tensor([3, 7, 1, 10]), torch.tensor([0, 5, 2, 11])]
    for idx in order:
        snaps.append(snapshot(model, mlp))
        opt.zero_grad()
        with sketcher.step((x[idx], y[idx]), idx) as captured:
            F.cross_entropy(model(x[idx]), y[idx]).backward()  # a mean: rows are rescaled by B
        opt.step()
        assert captured
    store = sketcher.stores["epoch0"]
    np.testing.assert_array_equal(store.indices, torch.cat(order).numpy())
    rows = store.rows()
    for t, idx in enumerate(order):
        ref = autograd_rows(snaps[t], task, [(x[i : i + 1], y[i : i + 1]) for i in idx.tolist()])
        torch.testing.assert_close(rows[4 * t : 4 * t + 4], ref, rtol=1e-12, atol=1e-14)
        feat = sa.Featurizer(snaps[t], task, projector="identity", progress=False)
        torch.testing.assert_close(rows[4 * t : 4 * t + 4], feat.train_rows((x, y), indices=idx.tolist()), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(rows[0], autograd_rows(model, task, [(x[3:4], y[3:4])])[0])  # after the update: differs


class ScaleInPlace(torch.nn.Module):
    def forward(self, h):
        return h.mul_(2.0)  # changes the previous layer's output in place


class TiedOutside(torch.nn.Module):
    """Uses a Linear's weight outside its forward: hooks cannot see that use."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 5)

    def forward(self, x):
        return self.a(x) @ self.a.weight.T


def test_in_place_ops_after_a_hooked_module_and_unseen_uses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), ScaleInPlace(), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    (x, y), task = mlp_data(), sa.ClassificationTask()
    sketcher = TrainTimeSketcher(model, task, projector="identity")
    with sketcher.step((x[:4], y[:4]), torch.arange(4)):
        F.cross_entropy(model(x[:4]), y[:4]).backward()
    ref = autograd_rows(model, task, [(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(sketcher.stores["epoch0"].rows(), ref, rtol=1e-12, atol=1e-14)
    torch.manual_seed(0)
    tied = torch.nn.Sequential(TiedOutside(), torch.nn.Linear(5, 3)).double()
    sketcher = TrainTimeSketcher(tied, task, projector="identity")
    with pytest.raises(sa.featurize.HookMismatchError, match="outside its module"):
        with sketcher.step((x[:4], y[:4]), torch.arange(4)):
            F.cross_entropy(tied(x[:4]), y[:4]).backward()


@pytest.mark.parametrize("projector", ["sjlt", "factgrass"])
def test_gpt2_padded_custom_loop_equals_projected_autograd_and_featurizer(projector):
    model, data = gpt2(), token_data(8)
    task, collate = sa.CausalLMTask(), sa.PadCollator()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    sketcher = TrainTimeSketcher(model, task, projector=projector, m=64, seed=3)
    model.train()
    for idx in ([0, 1, 2, 3], [4, 5, 6, 7]):
        snap = snapshot(model, gpt2)
        batch = collate([data[i] for i in idx])
        opt.zero_grad()
        with sketcher.step(batch, idx):  # the loss is a mean over the batch's predicted tokens
            (task.train_loss(model, batch) / batch["attention_mask"][:, 1:].sum()).backward()
        opt.step()
    rows = sketcher.stores["epoch0"].rows()[4:]
    sel, proj = sketcher.featurizer().selection(), sketcher.featurizer().projector
    ref = per_example_rows(snap, task, [{k: v[None] for k, v in data[i].items()} for i in idx], sel, proj)
    torch.testing.assert_close(rows, ref, rtol=1e-9, atol=1e-12)
    feat = sketcher.featurizer(snap, collate_fn=collate, progress=False)
    torch.testing.assert_close(rows, feat.train_rows(data, indices=idx), rtol=1e-9, atol=1e-12)


def test_epoch_groups_hold_every_visited_index_once():
    model, (x, y) = mlp(), mlp_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainTimeSketcher(model, sa.ClassificationTask(), projector="gaussian", m=16) as sketcher:
        for epoch in range(2):
            for idx in torch.randperm(12, generator=torch.Generator().manual_seed(epoch)).split(4):
                opt.zero_grad()
                with sketcher.step((x[idx], y[idx]), idx, epoch=epoch):
                    F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
                opt.step()
        with sketcher.step((x[:4], y[:4]), torch.arange(4), epoch=1):  # a second visit within epoch 1: skipped
            F.cross_entropy(model(x[:4]), y[:4]).backward()
    assert sorted(sketcher.stores) == ["epoch0", "epoch1"] and sketcher.skipped == 4
    rows = {}
    for name, store in sketcher.stores.items():
        assert sorted(store.indices.tolist()) == list(range(12))
        rows[name] = store.rows()[np.argsort(store.indices)]
    assert not torch.allclose(rows["epoch0"], rows["epoch1"])  # other parameters in the second epoch


def test_step_schedule():
    assert [t for t in range(7) if StepSchedule(3)(t)] == [0, 3, 6]
    assert [t for t in range(7) if StepSchedule([1, 4])(t)] == [1, 4]
    assert [t for t in range(7) if StepSchedule(lambda t: t > 4)(t)] == [5, 6]
    model, (x, y) = mlp(), mlp_data()
    sketcher = TrainTimeSketcher(model, sa.ClassificationTask(), projector="identity", steps=[1], group_by="step")
    for t in range(3):
        with sketcher.step((x[:2], y[:2]), torch.tensor([2 * t, 2 * t + 1])) as captured:
            F.cross_entropy(model(x[:2]), y[:2]).backward()
        assert captured == (t == 1)
    assert list(sketcher.stores) == ["step1"] and sketcher.stores["step1"].indices.tolist() == [2, 3]
    with pytest.raises(ValueError, match=">= 1"):
        StepSchedule(0)


def test_a_captured_step_keeps_no_reference_to_its_graph():
    import gc
    import weakref

    model, (x, y) = mlp(), mlp_data()
    sketcher = TrainTimeSketcher(model, sa.ClassificationTask(), projector="sjlt", m=8)
    gc.disable()  # a reference cycle would keep the step's tensors until the cyclic collector runs
    try:
        for _ in range(2):
            with sketcher.step((x[:4], y[:4]), torch.arange(4)):
                out = model(x[:4])
                alive = weakref.ref(out)
                F.cross_entropy(out, y[:4]).backward()
                del out
            assert alive() is None
    finally:
        gc.enable()


def test_loss_not_a_multiple_of_the_task_loss_is_refused():
    model, (x, y) = mlp(), mlp_data()
    sketcher = TrainTimeSketcher(model, sa.ClassificationTask(), projector="identity")
    with pytest.raises(ValueError, match="not a positive multiple"):
        with sketcher.step((x[:4], y[:4]), torch.arange(4)):
            F.cross_entropy(model(x[:4]), y[:4], label_smoothing=0.2).backward()
    with pytest.raises(RuntimeError, match="loss.backward"):
        with sketcher.step((x[:4], y[:4]), torch.arange(4)):
            model(x[:4])
    c = example_scales(torch.tensor([[2.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 2.0], [0.0, 0.0]]), 1e-6)
    assert c.tolist() == [2.0, 1.0]


def test_disk_store_resumes_and_refuses_other_settings(tmp_path):
    model, (x, y) = mlp(), mlp_data()
    task, path = sa.ClassificationTask(), tmp_path / "train_time.h5"

    def run(seed, idx):
        sk = TrainTimeSketcher(model, task, projector="sjlt", m=8, seed=seed, store="disk", path=path, dataset=(x, y))
        with sk:
            with sk.step((x[idx], y[idx]), idx):
                F.cross_entropy(model(x[idx]), y[idx]).backward()
        return sk

    run(0, torch.tensor([0, 1, 2, 3]))
    again = run(0, torch.tensor([2, 3, 4, 5]))  # a resumed run: rows 2, 3 are kept, 4, 5 added
    assert again.skipped == 2
    store = sa.DiskStore(path, checkpoint="epoch0")
    assert sorted(store.indices.tolist()) == [0, 1, 2, 3, 4, 5]
    assert store.metadata.model_fingerprint.startswith("train-time:")
    with pytest.raises(sa.StoreMismatchError, match="projector"):
        run(1, torch.tensor([6, 7]))
    with pytest.raises(sa.StoreMismatchError):  # rows of a Featurizer pass never join a train-time group
        sa.Featurizer(model, task, projector="sjlt", m=8, progress=False).featurize((x, y), store=store)


def test_query_rows_score_against_a_train_time_group():
    model, (x, y) = mlp(), mlp_data()
    sketcher = TrainTimeSketcher(model, sa.ClassificationTask(), projector="sjlt", m=8)
    with sketcher.step((x, y), torch.arange(12)):
        F.cross_entropy(model(x), y).backward()
    store = sketcher.stores["epoch0"]
    scores = sa.SketchedInfluence(damping=1.0).fit(store).score(sketcher.query_rows((x[:3], y[:3])))
    assert scores.shape == (3, 12)
    plain = sketcher.featurizer(progress=False).query_rows((x[:3], y[:3]))
    if getattr(plain, "metadata", None) is not None:  # provenance-checked queries: another model is refused
        with pytest.raises(sa.StoreMismatchError):
            sa.SketchedInfluence(damping=1.0).fit(store).score(plain)


def test_indexed_dataset_and_missing_indices_error():
    data = IndexedDataset([{"input_ids": torch.arange(3)}, (torch.zeros(2), 1)])
    assert data[0]["dataset_index"] == 0 and data[1][-1] == 1
    transformers = pytest.importorskip("transformers")
    from sketchattr.integrations import SketchCallback

    model, cb = gpt2(), SketchCallback(sa.CausalLMTask(), m=32)
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        cb.on_train_begin(args, state, control, model=model)
    args.remove_unused_columns = False
    cb.on_train_begin(args, state, control, model=model)
    cb.on_step_begin(args, state, control)
    model.train()
    with pytest.raises(ValueError, match="no 'dataset_index' entry"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 5, dtype=torch.long))
    cb.remove()


def test_hf_trainer_callback_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sketchattr.integrations import SketchCallback

    model, data = gpt2(), token_data(16, seed=1)
    snaps: dict[int, torch.nn.Module] = {}

    class Snapshot(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            snaps[state.global_step] = snapshot(model, gpt2)

    sketch = SketchCallback(sa.CausalLMTask(), projector="sjlt", m=32, group_by="step", store="disk", path=tmp_path / "s.h5")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=0.05, remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=IndexedDataset(data),
                                   data_collator=sa.PadCollator(), callbacks=[Snapshot(), sketch])
    trainer.train()
    assert sorted(sketch.stores) == ["step0", "step1", "step2", "step3"]  # 2 epochs x 2 updates of 2 micro-batches
    for epoch in range(2):
        seen = np.concatenate([sketch.stores[f"step{2 * epoch + k}"].indices for k in range(2)])
        assert sorted(seen.tolist()) == list(range(16))  # every example once per epoch, by its dataset index
    for t in range(4):
        store = sa.DiskStore(tmp_path / "s.h5", checkpoint=f"step{t}")
        feat = sketch.sketcher.featurizer(snaps[t], collate_fn=sa.PadCollator(), progress=False)
        assert store.metadata.model_fingerprint == feat.metadata().model_fingerprint  # the parameters before update t
        ref = feat.train_rows(data, indices=store.indices.tolist())
        # HF's loss runs in float32 (it upcasts logits to float32 at most): agreement to float32 precision
        err = (store.rows().double() - ref).norm(dim=1) / ref.norm(dim=1)
        assert float(err.max()) < 1e-6


def test_only_the_callback_module_imports_transformers():
    import ast
    import pathlib

    import sketchattr.featurize.train_time as train_time
    import sketchattr.integrations as integrations

    for module in (train_time, integrations):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]  # module-level imports only
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(x.split(".")[0] in ("transformers", "peft") or x.endswith("hf_trainer") for x in names), module


def test_hf_trainer_epoch_groups_save_steps_and_resume(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sketchattr.integrations import SketchCallback

    data = IndexedDataset(token_data(16, seed=2))

    class Crash(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt("simulated crash")

    def run(name, extra=(), resume=None):
        sketch = SketchCallback(sa.CausalLMTask(), projector="factgrass", m=32, steps="save", store="disk",
                                path=tmp_path / f"{name}.h5")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=8, learning_rate=0.05,
            remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
            logging_strategy="no", disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=data, data_collator=sa.PadCollator(),
                                       callbacks=[sketch, *extra])
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            sketch.remove()  # a real crash ends the process, which releases the store's lock
        return sketch

    run("full")
    full = {g: sa.DiskStore(tmp_path / "full.h5", checkpoint=g) for g in ("epoch0", "epoch1")}
    assert [len(s) for s in full.values()] == [8, 8]  # steps 0, 2 | 4, 6 of 4 steps an epoch: 2 batches of 4 each
    with pytest.raises(KeyboardInterrupt):
        run("crash", extra=[Crash()])
    (tmp_path / "crash.h5").rename(tmp_path / "resumed.h5")
    resumed = run("resumed", resume=str(tmp_path / "crash" / "checkpoint-4"))
    for group, ref in full.items():
        store = sa.DiskStore(tmp_path / "resumed.h5", checkpoint=group)
        np.testing.assert_array_equal(np.sort(store.indices), np.sort(ref.indices))
        a, b = store.rows()[np.argsort(store.indices)], ref.rows()[np.argsort(ref.indices)]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert resumed.sketcher.skipped == 4  # step 4 ran before the crash (its rows were kept) and again after resuming
