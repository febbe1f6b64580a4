import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import tiny_data, tiny_mlp
from sketchattr import ClassificationTask, Featurizer, SketchedInfluence
from sketchattr.store import CPUStore, DiskStore, MemoryStore, StoreCorruptedError, StoreMismatchError, make_store


def _feat(model, **kw):
    kw.setdefault("projector", "gaussian")
    kw.setdefault("m", 16)
    return Featurizer(model, ClassificationTask(), seed=kw.pop("seed", 0), batch_size=kw.pop("batch_size", 5), progress=False, **kw)


def test_layout_is_plain_h5py(tmp_path, mlp, data):
    path = tmp_path / "s.h5"
    store = _feat(mlp).featurize(data, store="disk", path=path)
    rows = store.rows()
    store.close()
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "sketchattr-store"
        g = f["main"]
        assert g["rows"].shape == (24, 16) and g["rows"].chunks is not None and g["rows"].maxshape == (None, 16)
        assert g["written"][:].all() and (g["indices"][:] == np.arange(24)).all() and (g["weights"][:] == 1).all()
        assert g.attrs["projector_type"] == "gaussian" and g.attrs["m"] == 16 and g.attrs["seed"] == 0
        assert g.attrs["storage_dtype"] == "float32"
        assert np.allclose(g["rows"][:], rows.numpy())


@pytest.mark.parametrize("storage_dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_storage_round_trip(tmp_path, mlp, data, storage_dtype, torch_dtype):
    feat = _feat(mlp)
    exact = feat.train_rows(data)
    store = feat.featurize(data, store=DiskStore(tmp_path / "h.h5", storage_dtype=storage_dtype))
    back = DiskStore(tmp_path / "h.h5").rows()
    assert back.dtype == torch_dtype
    assert torch.equal(back, exact.to(torch_dtype))


def test_memory_cpu_disk_give_identical_scores(tmp_path, mlp, data):
    x, y = data
    feat = _feat(mlp, dtype=torch.float32)
    q = feat.query_rows((x[:5], y[:5]))
    stores = [MemoryStore(), CPUStore(), DiskStore(tmp_path / "d.h5", block_bytes=16 * 4 * 7)]
    for store in stores:
        feat.featurize(data, store=store)
    assert all(torch.equal(s.rows(), stores[0].rows()) for s in stores)
    for block_rows in (None, 7):  # None: each store's own blocks (disk streams 7 rows at a time)
        scores = []
        for store in stores:
            scorer = SketchedInfluence(damping=0.01, block_rows=block_rows).fit(store)
            scores.append((scorer.score(q), scorer.top_k(q, k=4), scorer.self_influence()))
        for s, top, si in scores[1:]:
            same = torch.equal if block_rows else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6)  # fp32 scores
            assert same(s, scores[0][0]) and same(si, scores[0][2])
            assert (top.proponents == scores[0][1].proponents).all()
    assert isinstance(make_store("cpu"), CPUStore) and isinstance(make_store("none"), MemoryStore)
    with pytest.raises(ValueError, match="available"):
        make_store("tape")


def test_reopen_and_mismatch(tmp_path, mlp, data):
    path = tmp_path / "r.h5"
    _feat(mlp).featurize(data, store=DiskStore(path)).close()
    again = DiskStore(path)
    assert len(again) == 24 and again.metadata.projector["type"] == "gaussian"
    for kw in ({"seed": 1}, {"projector": "sjlt"}, {"modules": ["2"]}):
        with pytest.raises(StoreMismatchError):
            _feat(mlp, **kw).featurize(data, store=DiskStore(path))
    other = tiny_mlp(seed=5)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        _feat(other).featurize(data, store=DiskStore(path))
    assert len(DiskStore(path)) == 24  # nothing lost
    store = _feat(mlp, seed=1).featurize(data, store=DiskStore(path), overwrite=True)
    assert store.metadata.projector["seed"] == 1 and len(store) == 24
    # a second checkpoint in the same file
    ck = _feat(other).featurize(data, store=DiskStore(path, checkpoint="epoch2"))
    assert sorted(ck.checkpoints()) == ["epoch2", "main"]


def test_unflagged_rows_are_never_read(tmp_path, mlp, data):
    path = tmp_path / "u.h5"
    feat = _feat(mlp)
    feat.featurize(data, store=DiskStore(path)).close()
    with h5py.File(path, "a") as f:
        f["main/written"][[3, 10]] = False
        f["main/rows"][3] = np.nan  # half-written garbage
    store = DiskStore(path, partial=True)  # reading a partial store is asked for explicitly
    assert 3 not in store.indices and len(store) == 22
    assert store.missing(np.arange(24)).tolist() == [3, 10]
    assert torch.isfinite(store.rows()).all()
    with pytest.raises(ValueError, match="22 of its 24 planned rows"):
        DiskStore(path).rows()
    feat.featurize(data, store=store)  # repairs the two rows
    assert torch.equal(store.rows(), feat.train_rows(data).float())


def test_corrupted_file_gives_clear_error(tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(StoreCorruptedError, match="corrupted"):
        DiskStore(path)
    ok = tmp_path / "t.h5"
    store = _feat(tiny_mlp()).featurize(tiny_data(), store=DiskStore(ok))
    store.close()
    data = ok.read_bytes()
    ok.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreCorruptedError):
        DiskStore(ok).rows()


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_mlp, tiny_data
    from sketchattr import ClassificationTask, Featurizer
    from sketchattr.store import DiskStore

    class Slow(DiskStore):
        def write(self, *a, **k):
            super().write(*a, **k)
            print("wrote", flush=True)
            time.sleep(0.5)

    x, y = tiny_data(n=40)
    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=4, progress=False)
    feat.featurize((x, y), store=Slow({path!r}, buffer_bytes=0))  # commit every batch
    print("done", flush=True)
    """
)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    path = tmp_path / "killed.h5"
    code = CHILD.format(tests=os.path.dirname(__file__), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    writes = 0
    for line in proc.stdout:
        writes += line.startswith("wrote")
        if writes == 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    x, y = tiny_data(n=40)
    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=4, progress=False)
    store = DiskStore(path)
    assert len(store) == 12 and len(store.missing(np.arange(40))) == 28

    computed = []
    original = feat.iter_rows
    feat.iter_rows = lambda ds, idx, **kw: (computed.extend(idx.tolist()), original(ds, idx, **kw))[1]
    feat.featurize((x, y), store=store)
    assert sorted(computed) == list(range(12, 40))  # only the missing rows
    store.close()

    fresh = tmp_path / "fresh.h5"
    Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=4, progress=False).featurize(
        (x, y), store=DiskStore(fresh)
    ).close()
    with h5py.File(path, "r") as a, h5py.File(fresh, "r") as b:
        for name in ("indices", "written", "weights", "rows"):
            assert np.array_equal(a["main"][name][:], b["main"][name][:]), name


def test_sampler_indices_and_weights_are_stored(tmp_path, mlp):
    x, y = tiny_data(n=60)
    feat = _feat(mlp)
    store = feat.featurize((x, y), store=DiskStore(tmp_path / "s.h5"), sampler="stratified")
    from sketchattr.sample import StratifiedSampler, dataset_labels

    expect = StratifiedSampler(key="labels", rate=0.1).sample(60, keys=y.numpy())
    assert np.array_equal(np.sort(store.indices), expect.indices)
    assert np.allclose(store.weights[np.argsort(store.indices)], expect.weights)
    with pytest.raises(ValueError, match="either"):
        feat.featurize((x, y), sampler="uniform", indices=[1, 2])


def test_scoring_leaves_no_open_handle_on_the_file(tmp_path, mlp, data):
    x, y = data
    feat = _feat(mlp)
    store = feat.featurize(data, store=DiskStore(tmp_path / "h.h5"), indices=range(12))
    scorer = SketchedInfluence().fit(store)
    scorer.top_k(feat.query_rows((x[:3], y[:3])), k=2)
    feat.featurize(data, store=store)  # writing to the same file afterwards must work
    assert len(DiskStore(tmp_path / "h.h5")) == 24


def test_flipped_byte_in_rows_is_detected_and_named(tmp_path, mlp, data):
    """Chunks carry fletcher32 checksums: one flipped byte in the stored rows raises on read and
    names the damaged rows; the untouched file reads back bit-identical."""
    import h5py

    from sketchattr import StoreCorruptedError

    x, y = data
    path = tmp_path / "c.h5"
    feat = Featurizer(mlp, ClassificationTask(), projector="sjlt", m=16, seed=0, progress=False)
    rows = feat.featurize((x, y), store=DiskStore(path)).rows()
    assert torch.equal(DiskStore(path).rows(), rows)
    with h5py.File(path, "r") as f:
        assert f["main/rows"].fletcher32 and f["main/written"].fletcher32
        info = f["main/rows"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 5)
        byte = fh.read(1)
        fh.seek(info.byte_offset + 5)
        fh.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(StoreCorruptedError, match=r"rows 0\.\.\d+ \(dataset indices 0\.\.\d+\) fail their checksum"):
        DiskStore(path).rows()


class ScaledTask(ClassificationTask):
    """A user Task whose constructor argument changes the loss (and so every row)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def train_loss(self, model, batch, sample=False):
        return self.scale * super().train_loss(model, batch, sample)


@pytest.mark.parametrize("store_kind", ["disk", "memory"])
def test_store_identity_covers_everything_that_changes_a_row(tmp_path, mlp, data, store_kind):
    """Compute dtype, the Task's configuration and the dataset itself are part of a store's identity:
    appending rows made otherwise is refused with a message that names the difference."""
    from sketchattr import StoreMismatchError

    x, y = data
    make = (lambda: DiskStore(tmp_path / "i.h5")) if store_kind == "disk" else (lambda: store)
    store = MemoryStore()
    half = len(x) // 2
    feat = Featurizer(mlp.float(), ScaledTask(1.0), projector="sjlt", m=16, seed=0, progress=False)
    feat.featurize((x.float(), y), store=make(), indices=range(half))
    with pytest.raises(StoreMismatchError, match=r"dtype: store has 'torch.float32', requested 'torch.float64'"):
        Featurizer(mlp.float(), ScaledTask(1.0), projector="sjlt", m=16, seed=0, dtype=torch.float64,
                   progress=False).featurize((x.float(), y), store=make())
    with pytest.raises(StoreMismatchError, match=r"task: store has 'ScaledTask\(scale=1.0\)', requested 'ScaledTask\(scale=2.0\)'"):
        Featurizer(mlp.float(), ScaledTask(2.0), projector="sjlt", m=16, seed=0, progress=False).featurize((x.float(), y), store=make())
    other = (torch.flip(x, [0]).float(), torch.flip(y, [0]))  # same length, other examples
    with pytest.raises(StoreMismatchError, match="another dataset"):
        feat.featurize(other, store=make())
    feat.featurize((x.float(), y), store=make())  # the same settings resume
    assert len(make()) == len(x)


def test_storage_dtype_of_an_existing_store_is_enforced(tmp_path, mlp, data):
    from sketchattr import StoreMismatchError

    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), projector="sjlt", m=16, seed=0, progress=False)
    feat.featurize((x, y), store=DiskStore(tmp_path / "s.h5"), indices=range(10))
    with pytest.raises(StoreMismatchError, match="stores rows as float32; storage_dtype='float16' was requested"):
        feat.featurize((x, y), store=DiskStore(tmp_path / "s.h5", storage_dtype="float16"))
    feat.featurize((x, y), store=DiskStore(tmp_path / "s.h5"))  # no dtype requested: the file's own
    feat.featurize((x, y), store=DiskStore(tmp_path / "s.h5", storage_dtype="float32"))
    assert len(DiskStore(tmp_path / "s.h5")) == len(x)


def test_a_second_writer_is_refused_even_without_hdf5_file_locking(tmp_path, mlp, data):
    """Two processes, HDF5_USE_FILE_LOCKING=FALSE (as on NFS/Lustre): while one holds a writing
    session, the other gets StoreLockedError naming the store; after it exits, writing works."""
    from sketchattr import StoreLockedError

    path, ready = tmp_path / "l.h5", tmp_path / "ready"
    holder = textwrap.dedent(f"""
        import time, pathlib
        from sketchattr import DiskStore
        store = DiskStore({str(path)!r})
        with store.writing():
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(30)
    """)
    env = dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE")
    proc = subprocess.Popen([sys.executable, "-c", holder], env=env)
    try:
        for _ in range(300):
            if ready.exists() or proc.poll() is not None:
                break
            import time

            time.sleep(0.05)
        assert ready.exists(), "the holder process did not start"
        x, y = data
        feat = Featurizer(mlp, ClassificationTask(), projector="sjlt", m=8, seed=0, progress=False)
        with pytest.raises(StoreLockedError, match=r"l\.h5 is being written by another process"):
            feat.featurize((x, y), store=DiskStore(path))
    finally:
        proc.kill()
        proc.wait()
    store = feat.featurize((x, y), store=DiskStore(path))  # the lock died with its process
    assert len(store) == len(x)


CREATE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_mlp, tiny_data
    from sketchattr import ClassificationTask, Featurizer
    from sketchattr.store import DiskStore

    class DiesWhileCreating(DiskStore):
        def _create_group(self, f, meta):
            g = f.create_group(self.checkpoint)
            g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="i8", chunks=(16,))
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # the worst instant: the group half made

    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=4, progress=False)
    feat.featurize(tiny_data(n=12), store=DiesWhileCreating({path!r}, checkpoint={checkpoint!r}))
    """
)


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_while_creating_a_store_leaves_nothing_to_delete(tmp_path, existing):
    """Killed in the middle of creating the store (a new file, or a new checkpoint group in an existing
    file): the same command then runs through and gives the uninterrupted rows."""
    path = tmp_path / "new.h5"
    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=4, progress=False)
    if existing:
        feat.featurize(tiny_data(n=12), store=DiskStore(path, checkpoint="first"))
    code = CREATE_CHILD.format(tests=os.path.dirname(__file__), path=str(path), checkpoint="second")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(DiskStore(path, checkpoint="second")) == 0  # a valid store without the half-made group
    store = feat.featurize(tiny_data(n=12), store=DiskStore(path, checkpoint="second"))
    assert torch.equal(store.rows(), feat.train_rows(tiny_data(n=12)).float())
    if existing:
        assert len(DiskStore(path, checkpoint="first")) == 12
    assert not list(tmp_path.glob(".new.h5.*.tmp"))  # the dead process's temporary file is cleaned up


SCORE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_mlp, tiny_data
    from sketchattr import ClassificationTask, Featurizer, SketchedInfluence

    x, y = tiny_data(n=40)
    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, progress=False)
    scorer = SketchedInfluence(damping=0.1, block_rows=8).fit(feat.featurize((x, y)))
    blocks = scorer.iter_scores

    def dying(q, **kw):
        for k, item in enumerate(blocks(q, **kw)):
            if k == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # killed with the score file half written
            yield item

    scorer.iter_scores = dying
    scorer.score_to_hdf5(feat.query_rows((x[:5], y[:5])), {path!r}, dataset="again")
    """
)


def test_score_file_killed_while_writing_keeps_the_old_file_and_reruns(tmp_path):
    """score_to_hdf5 builds the file aside and renames it: a SIGKILL mid-write leaves the previous
    complete file (its other datasets intact) and the same call then runs through."""
    import h5py

    x, y = tiny_data(n=40)
    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, progress=False)
    scorer = SketchedInfluence(damping=0.1, block_rows=8).fit(feat.featurize((x, y)))
    q = feat.query_rows((x[:5], y[:5]))
    path = tmp_path / "scores.h5"
    scorer.score_to_hdf5(q, path)
    before = h5py.File(path, "r")["scores"][()]
    proc = subprocess.run([sys.executable, "-c", SCORE_CHILD.format(tests=os.path.dirname(__file__), path=str(path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with h5py.File(path, "r") as f:
        assert set(f) == {"scores", "train_indices"} and np.array_equal(f["scores"][()], before)
    scorer.score_to_hdf5(q, path, dataset="again")
    with h5py.File(path, "r") as f:
        assert set(f) == {"scores", "again", "train_indices"}
        assert np.array_equal(f["again"][()], before) and np.array_equal(f["scores"][()], before)
    assert not list(tmp_path.glob(".scores.h5.*.tmp"))


def test_full_disk_and_write_errors_keep_rows_and_resume(tmp_path, monkeypatch):
    """A disk that fills up (simulated: the free space the store checks before each commit) and a
    write that fails with ENOSPC (simulated in HDF5's write) each raise StoreWriteError naming the
    path and the rows kept; after 'freeing space' the same command resumes to the uninterrupted rows."""
    import errno
    import shutil
    from collections import namedtuple

    import sketchattr.store.disk_space as disk_space
    from sketchattr import StoreWriteError

    x, y = tiny_data(n=40)
    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=4, progress=False)
    ref = feat.train_rows((x, y)).float()
    path = tmp_path / "full.h5"
    Usage = namedtuple("Usage", "total used free")
    commits = {"n": 0}
    real_usage, real_write = shutil.disk_usage, DiskStore._write_rows

    def counted_write(self, *args):
        real_write(self, *args)
        commits["n"] += 1

    def filling_disk(p):  # full once 3 commits are on disk (creating the store checks free space too)
        return Usage(1, 1, 0) if commits["n"] >= 3 else real_usage(p)

    monkeypatch.setattr(DiskStore, "_write_rows", counted_write)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", filling_disk)
    with pytest.raises(StoreWriteError, match=r"full\.h5: the disk is \(nearly\) full .* 12 rows are on disk and kept"):
        feat.featurize((x, y), store=DiskStore(path, buffer_bytes=0))
    monkeypatch.setattr(disk_space.shutil, "disk_usage", real_usage)
    monkeypatch.setattr(DiskStore, "_write_rows", real_write)

    calls = {"n": 0}

    def failing_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args)

    monkeypatch.setattr(DiskStore, "_write_rows", failing_write)
    with pytest.raises(StoreWriteError, match=r"writing 4 rows to .*full\.h5 failed .*No space left.* the 16 rows committed"):
        feat.featurize((x, y), store=DiskStore(path, buffer_bytes=0))
    monkeypatch.setattr(DiskStore, "_write_rows", real_write)
    store = feat.featurize((x, y), store=DiskStore(path, buffer_bytes=0))
    assert torch.equal(store.rows(), ref)


@pytest.mark.parametrize("stage,trials", [("fit_factors", 1), ("featurize_2ranks", 1)])  # benchmarks/crash_resume.py --quick: 24 trials
def test_crash_resume_harness(stage, trials):
    """benchmarks/crash_resume.py: SIGKILL at a random instant (of one process, or of one of two gloo
    ranks, whose survivor must stop by itself), rerun, bit-identical output."""
    import json as _json

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "crash_resume.py"),
                           "--trials", str(trials), "--stages", stage, "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _json.loads(proc.stdout.strip().splitlines()[-1])
    assert report[stage]["resumed_bit_identical"] == trials


def test_read_only_store_is_named_read_only_and_still_scores(tmp_path, monkeypatch, mlp, data):
    """A store on a read-only file system (simulated: the OS refuses the lock file, errno EROFS, as a
    real read-only tmpfs does) reads and scores; extending it raises PermissionError saying read-only,
    not 'corrupted'."""
    import errno

    import filelock

    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), projector="sjlt", m=8, seed=0, progress=False)
    path = tmp_path / "ro.h5"
    feat.featurize((x, y), store=DiskStore(path), indices=range(10))

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path) + ".lock")

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    store = DiskStore(path)
    assert len(store) == 10 and SketchedInfluence(damping=0.1).fit(store).sigma_max > 0
    with pytest.raises(PermissionError, match=r"ro\.h5 cannot be written.*Read-only file system.*read and scored, not extended"):
        feat.featurize((x, y), store=DiskStore(path))


# ---------------------------------------------------------------- issue 25 item 4: reliability leftovers
def _flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ mask]))


def _raw_store(path: Path, n: int, m: int) -> "DiskStore":
    """A DiskStore of ``n`` random float32 rows of width ``m`` (no model: fast), dataset indices 1000+i."""
    from sketchattr.store import StoreMetadata

    store = DiskStore(path)
    meta = StoreMetadata(projector={"type": "gaussian", "m": m, "seed": 0}, modules={}, model_fingerprint="x", task="t", dim=m)
    idx = 1000 + np.arange(n)
    store.prepare(meta, planned=idx)
    store.write(idx, torch.randn(n, m, generator=torch.Generator().manual_seed(0)))
    return store


def test_creating_a_store_on_a_full_disk_leaves_nothing_and_reruns(tmp_path, monkeypatch):
    """64 KiB free (simulated: the free space the store checks): creating the store and its row index is
    refused before anything is written — no file at the path, no temporary left — and after 'freeing
    space' the same command runs through. A new checkpoint in an existing file leaves that file as it was."""
    import shutil
    from collections import namedtuple

    import sketchattr.store.disk_space as disk_space
    from sketchattr import StoreWriteError

    x, y = tiny_data(n=40)
    feat = Featurizer(tiny_mlp(), ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=4, progress=False)
    path = tmp_path / "new.h5"
    real_usage = shutil.disk_usage
    nearly_full = lambda p: namedtuple("Usage", "total used free")(2**30, 2**30 - 2**16, 2**16)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", nearly_full)
    with pytest.raises(StoreWriteError, match=r"new\.h5: the disk is \(nearly\) full — 0\.1 MiB free.*free space and rerun"):
        feat.featurize((x, y), store=DiskStore(path))
    assert not path.exists() and not list(tmp_path.glob(".new.h5.*.tmp"))
    monkeypatch.setattr(disk_space.shutil, "disk_usage", real_usage)
    feat.featurize((x, y), store=DiskStore(path, checkpoint="first"))
    before = path.read_bytes()
    monkeypatch.setattr(disk_space.shutil, "disk_usage", nearly_full)
    with pytest.raises(StoreWriteError, match="full"):
        feat.featurize((x, y), store=DiskStore(path, checkpoint="second"))
    assert path.read_bytes() == before  # the existing file untouched
    monkeypatch.setattr(disk_space.shutil, "disk_usage", real_usage)
    store = feat.featurize((x, y), store=DiskStore(path))
    assert torch.equal(store.rows(), feat.train_rows((x, y)).float())
    assert torch.equal(DiskStore(path, checkpoint="first").rows(), store.rows())


def test_flipped_bit_in_metadata_is_caught_by_its_checksum(tmp_path, mlp, data):
    """One flipped bit turns seed 0 into seed 1 in the metadata attribute: opening the store then raises
    StoreCorruptedError naming the attribute, and a seed-1 featurize is refused, not accepted."""
    from sketchattr import StoreCorruptedError

    x, y = data
    path = tmp_path / "m.h5"
    _feat(mlp, projector="sjlt").featurize(data, store=DiskStore(path))
    raw = path.read_bytes()
    assert raw.count(b'"seed": 0') == 1
    _flip_byte(path, raw.index(b'"seed": 0') + len(b'"seed": '), 0x01)  # '0' -> '1'
    with h5py.File(path, "r") as f:
        assert '"seed": 1' in f["main"].attrs["metadata"]
    with pytest.raises(StoreCorruptedError, match=r"m\.h5: attribute 'metadata' of checkpoint 'main' does not match its sha256"):
        DiskStore(path)
    with pytest.raises(StoreCorruptedError, match="'metadata'"):
        _feat(mlp, projector="sjlt", seed=1).featurize(data, store=DiskStore(path, checkpoint="main"))


def test_store_without_attribute_checksums_is_read_with_a_warning_and_upgraded_on_write(tmp_path, mlp, data):
    """Stores written before the checksums existed open with a warning; the next write adds them."""
    path = tmp_path / "old.h5"
    feat = _feat(mlp, projector="sjlt")
    rows = feat.featurize(data, store=DiskStore(path)).rows()
    with h5py.File(path, "a") as f:
        del f["main"].attrs["attrs_sha256"]
    with pytest.warns(UserWarning, match="no checksums of its attributes"):
        assert torch.equal(DiskStore(path).rows(), rows)
    with pytest.warns(UserWarning, match="added the next time the store is written"):
        feat.featurize(data, store=DiskStore(path))  # a resume (nothing to compute) adds the checksums
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(DiskStore(path).rows(), rows)


def test_reader_refuses_a_half_written_store_and_one_being_written(tmp_path, mlp, data):
    """A store whose planned rows are not all written is refused by readers (fit, iter_blocks, rows)
    unless opened with partial=True; a store whose lock another writer holds is refused always — as
    with HDF5_USE_FILE_LOCKING=FALSE, where HDF5 itself would not notice the writer."""
    from filelock import FileLock

    from sketchattr.store import StoreIncompleteError, StoreLockedError

    path = tmp_path / "half.h5"
    feat = _feat(mlp)
    feat.featurize(data, store=DiskStore(path), max_rows=8)
    store = DiskStore(path)
    assert len(store) == 10  # informational reads still work
    for read in (lambda: SketchedInfluence().fit(store), lambda: store.rows(), lambda: next(store.iter_blocks(4))):
        with pytest.raises(StoreIncompleteError, match=r"half\.h5 holds 10 of its 24 planned rows.*partial=True"):
            read()
    partial = DiskStore(path, partial=True)
    assert len(partial.rows()) == 10 and SketchedInfluence(damping=0.1).fit(partial).n_train == 10
    feat.featurize(data, store=DiskStore(path))
    writer = FileLock(str(path) + ".lock")  # another writer's OS lock (a separate lock: conflicts even in-process)
    writer.acquire()
    try:
        for reader in (DiskStore(path), DiskStore(path, partial=True)):
            with pytest.raises(StoreLockedError, match=r"half\.h5 is being written by another process"):
                SketchedInfluence().fit(reader)
    finally:
        writer.release()
    assert torch.equal(DiskStore(path).rows(), feat.train_rows(data).float())


def test_damaged_chunk_is_named_by_its_row_range(tmp_path):
    """fletcher32 checksums are per HDF5 chunk (256 rows at m=1024): a flipped byte is reported as the
    chunk's rows whatever block size the reader uses (was: 'rows 0..0' from a one-row read)."""
    from sketchattr import StoreCorruptedError

    path = tmp_path / "c.h5"
    _raw_store(path, 600, 1024)
    with h5py.File(path, "r") as f:
        assert f["main/rows"].chunks == (256, 1024)
        first = f["main/rows"].id.get_chunk_info_by_coord((0, 0)).byte_offset
        second = f["main/rows"].id.get_chunk_info_by_coord((256, 0)).byte_offset
    _flip_byte(path, second + 4097)
    msg = r"'main/rows', rows 256\.\.511 \(dataset indices 1256\.\.1511\) fail their checksum"
    for block_rows in (1, 100, None):
        with pytest.raises(StoreCorruptedError, match=msg):
            list(DiskStore(path).iter_blocks(block_rows))
    _flip_byte(path, first + 5)
    with pytest.raises(StoreCorruptedError, match=r"rows 0\.\.255 \(dataset indices 1000\.\.1255\), rows 256\.\.511"):
        DiskStore(path).rows()
    with pytest.raises(StoreCorruptedError, match=r"rows 0\.\.255 \(dataset indices 1000\.\.1255\) fail"):
        SketchedInfluence(damping=0.1).fit(DiskStore(path))  # reads a 1-row block first


def test_flipped_byte_in_weights_is_named_like_the_rows(tmp_path):
    from sketchattr import StoreCorruptedError

    path = tmp_path / "w.h5"
    _raw_store(path, 300, 8)
    with h5py.File(path, "r") as f:
        info = f["main/weights"].id.get_chunk_info(0)
    _flip_byte(path, info.byte_offset + 3)
    msg = r"w\.h5: dataset 'main/weights', rows 0\.\.299 \(dataset indices 1000\.\.1299\) fail their checksum"
    with pytest.raises(StoreCorruptedError, match=msg):
        DiskStore(path).weights
    with pytest.raises(StoreCorruptedError, match=msg):
        SketchedInfluence(damping=0.1).fit(DiskStore(path))
