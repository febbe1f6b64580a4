"""Reliability leftovers found by crash-kill and input fuzzing (issue 25) that sit outside one module:
a crafted pickle given to the CLI is refused with one ``error:`` line, and nothing in it runs."""
from __future__ import annotations

import pickle

import pytest
import torch

from sketchattr.cli.main import main


class _Runs:
    """Unpickling this calls ``pathlib.Path(marker).touch()``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_tracin_refuses_a_crafted_pickle_with_one_error_line(tmp_path, capsys):
    from conftest import tiny_mlp

    marker = tmp_path / "ran"
    evil = tmp_path / "train.pt"
    evil.write_bytes(pickle.dumps({"x": _Runs(str(marker)), "y": torch.zeros(3)}, protocol=2))
    ck = tmp_path / "ck.pt"
    torch.save(tiny_mlp().state_dict(), ck)
    code = main(["tracin", "--model_def", "conftest:tiny_mlp", "--checkpoints", str(ck), "--train_data", str(evil),
                 "--test_data", str(evil), "--output", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists() and not (tmp_path / "out.json").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sketchattr tracin: error: "), err
    assert "train.pt" in lines[0] and "weights_only" in lines[0] and "Traceback" not in err


def test_safe_pickle_refusal_is_a_user_error(tmp_path):
    """sketchattr.data.safe_pickle's refusal is a ValueError too (the CLI's user errors) and names the file."""
    import io

    from sketchattr.cli.main import _user_errors
    from sketchattr.data.safe_pickle import UnsafePickleError, safe_load

    marker = tmp_path / "ran"
    with pytest.raises(UnsafePickleError, match=r"batch\.pkl: refused to load pathlib") as info:
        safe_load(io.BytesIO(pickle.dumps([_Runs(str(marker))])), "batch.pkl")
    assert isinstance(info.value, _user_errors()) and isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()
