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
