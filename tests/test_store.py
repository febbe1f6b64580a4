import numpy as np
import pytest
import torch

from sketchattr import ClassificationTask, Featurizer, MemoryStore
from sketchattr.store import StoreMismatchError


def test_reuse_with_other_projector_seed_or_model_fails(mlp, data):
    x, y = data
    store = Featurizer(mlp, ClassificationTask(), projector="sjlt", m=16, seed=0, progress=False).featurize((x, y))
    n = len(store)
    with pytest.raises(StoreMismatchError, match="seed"):
        Featurizer(mlp, ClassificationTask(), projector="sjlt", m=16, seed=1, progress=False).featurize((x, y), store=store)
    with pytest.raises(StoreMismatchError, match="type"):
        Featurizer(mlp, ClassificationTask(), projector="gaussian", m=16, seed=0, progress=False).featurize((x, y), store=store)
    with torch.no_grad():
        mlp[0].weight.add_(1e-3)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        Featurizer(mlp, ClassificationTask(), projector="sjlt", m=16, seed=0, progress=False).featurize((x, y), store=store)
    assert len(store) == n  # nothing lost


def test_append_validation():
    from sketchattr.store import StoreMetadata
    store = MemoryStore()
    with pytest.raises(ValueError, match="prepare"):
        store.write(np.arange(2), torch.zeros(2, 4))
    store.prepare(StoreMetadata(projector={}, modules={}, model_fingerprint="x", task="t", dim=4))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        store.write(np.arange(2), torch.zeros(2, 5))
    store.write(np.arange(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="already"):
        store.write(np.array([1]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="no rows"):
        MemoryStore().rows()
