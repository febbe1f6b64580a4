"""One rank of the 2-process Hugging Face Trainer run of tests/test_fsdp.py (argv: output folder):
a tiny GPT-2 trained by the Trainer's own distributed loop (DDP on CPU) with SketchCallback
capturing each step into its own group; the initial weights and each rank's first-step rows and
indices are saved for the test to compare with a featurizer."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from padded_lm import padded_tokens  # noqa: E402


def main(out: Path) -> None:
    import transformers as tf

    import sketchattr as sa
    from sketchattr.integrations.hf_trainer import SketchCallback

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(cfg)
    rank = int(os.environ["RANK"])
    if rank == 0:
        torch.save(model.state_dict(), out / "initial.pt")
    callback = SketchCallback(sa.CausalLMTask(), projector="sjlt", m=32, group_by="step")
    args = tf.TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2, num_train_epochs=1, use_cpu=True,
                                remove_unused_columns=False, report_to=[], save_strategy="no", logging_strategy="no", seed=0)
    tf.Trainer(model=model, args=args, train_dataset=sa.IndexedDataset(padded_tokens(8, 16, seed=1)), callbacks=[callback]).train()
    first = callback.stores[min(callback.stores, key=lambda g: int(g.removeprefix("step")))]
    torch.save({"rows": first.rows(), "indices": torch.as_tensor(first.indices)}, out / f"trainer{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
