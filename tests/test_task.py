import pytest
import torch

from sketchattr.task import ClassificationTask, RegressionTask, Task, margin, validate_task


def test_margin_matches_definition():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    expect = torch.stack([
        logits[0, 0] - torch.logsumexp(logits[0, [1, 2]], 0),
        logits[1, 1] - torch.logsumexp(logits[1, [0, 2]], 0),
    ])
    assert torch.allclose(margin(logits, y), expect)


def test_task_missing_method_fails_clearly():
    class Half(Task):
        def train_loss(self, model, batch, sample=False):
            return model(batch[0]).sum()

    with pytest.raises(TypeError, match="measurement"):
        Half()
    with pytest.raises(TypeError, match="train_loss"):
        validate_task(object())


def test_classification_task_sampling_draws_from_model(mlp, data):
    x, _ = data
    task = ClassificationTask()
    logits = torch.tensor([[0.0, 50.0, 0.0]]).repeat(200, 1)
    from sketchattr.task import sample_categorical
    assert (sample_categorical(logits) == 1).all()
    torch.manual_seed(0)
    a = task.train_loss(mlp, (x, torch.zeros(len(x), dtype=torch.long)), sample=True)
    torch.manual_seed(0)
    b = task.train_loss(mlp, (x, torch.zeros(len(x), dtype=torch.long)), sample=True)
    assert torch.equal(a, b)


def test_regression_task_signs():
    model = torch.nn.Linear(2, 1).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    task = RegressionTask()
    pred = model(x).squeeze(1)
    assert torch.allclose(task.train_loss(model, (x, y)), 0.5 * ((pred - y) ** 2).sum())
    assert torch.allclose(task.measurement(model, (x, y)), -0.5 * ((pred - y) ** 2).sum())
    assert torch.allclose(RegressionTask("output").measurement(model, (x, y)), pred.sum())
    with pytest.raises(ValueError):
        RegressionTask("bogus")


def test_classification_labels_are_validated_at_the_boundary():
    """Bad labels raise a message naming what was expected and found — not a torch index error or,
    for −100 (cross-entropy's ignore_index), a silently all-zero gradient row; [B, 1] is accepted."""
    from torch import nn

    from sketchattr import ClassificationTask, Featurizer

    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    feat = Featurizer(model, ClassificationTask(), progress=False)
    ref = feat.train_rows((x, y))
    assert torch.equal(feat.train_rows((x, y[:, None])), ref)  # [B, 1]: unambiguous
    cases = [
        (torch.tensor([0, 1, 10, 1, 0]), r"labels out of range: found \[0, 10\] for 3 classes"),
        (torch.tensor([0, 1, -100, 1, 0]), r"-100 \(cross-entropy's ignore_index\).*all-zero gradient"),
        (y.float() + 0.5, r"integer class ids.*found torch.float"),
        (torch.zeros(5, 2, dtype=torch.long), r"labels \[B\]; found \(5, 3\) and \(5, 2\)"),
    ]
    for labels, message in cases:
        with pytest.raises(ValueError, match=message):
            feat.train_rows((x, labels))
