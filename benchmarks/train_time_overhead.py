"""Overhead of building a sketched gradient store while training, against plain training.

A GPT-2 built from a config (4 layers, width 256, vocabulary 2,048: 3.7M parameters; ``--quick``:
2 layers, width 128, vocabulary 1,024: 0.5M) is trained on CPU on random token sequences of
32–64 tokens (right-padded batches of 16; every parameter attributed, every step sketched):

* with the Hugging Face ``Trainer``: plain, and with :class:`~sketchattr.integrations.SketchCallback`
  (memory store, one group per epoch) for each projector of ``--projectors`` (default FactGraSS
  and SJLT, m = 2,048);
* in a custom PyTorch loop (AdamW on the model's mean next-token loss): plain, and inside
  :meth:`~sketchattr.featurize.train_time.TrainTimeSketcher.step` with the first projector.

All variants start from the same model and see the same batches. They run interleaved step by
step (the Trainers in threads that hand a baton round, so exactly one computes at a time), so a
shared machine's changing load hits them alike. A variant's speed in a run is its median step
time after ``--warmup`` steps (the first sketched step also checks one example against
autograd; Trainer start-up and data loading are not timed; the sketch, which runs inside the
step before the optimizer update, is). A run's overhead is the median over steps of the ratio
of the variant's step time to the plain step of the same round, minus 1; the table gives the
median over ``--reps`` runs. Torch uses one thread (``--threads``): on a CPU shared with other
jobs, several threads mostly spin-wait for each other.

    python benchmarks/train_time_overhead.py [--quick] [--reps 3] [--steps 40] [--projectors factgrass sjlt]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


def make_model(layers: int, width: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A GPT-2 LM from a config (no download), dropout off."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=layers, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


def make_data(n: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random token sequences of 32–64 tokens, labels = tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in torch.randint(32, 65, (n,), generator=g).tolist():
        ids = torch.randint(3, vocab, (k,), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


class Baton:
    """Strict round-robin between ``n`` threads: ``hold(k)`` waits for turn k; ``release(k)`` hands it on."""

    def __init__(self, n: int) -> None:
        self.n, self.turn, self.done, self.error = n, 0, set(), None
        self.cv = threading.Condition()

    def hold(self, k: int) -> None:
        with self.cv:
            while self.turn != k:
                if self.error is not None:
                    raise RuntimeError("another variant failed") from self.error
                self.cv.wait(timeout=1.0)

    def release(self, k: int, finished: bool = False) -> None:
        with self.cv:
            if finished:
                self.done.add(k)
            if len(self.done) < self.n:
                nxt = (k + 1) % self.n
                while nxt in self.done:
                    nxt = (nxt + 1) % self.n
                self.turn = nxt
            self.cv.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cv:
            self.error = exc
            self.cv.notify_all()


def trainer_run(opts: argparse.Namespace, projectors: list[str | None], bar: tqdm) -> list[list[float]]:
    """Step times ``[variant][step]`` of Trainers (plain for None, else with the callback), interleaved."""
    import transformers

    import sketchattr as sa
    from sketchattr.integrations import IndexedDataset, SketchCallback

    baton = Baton(len(projectors))
    times: list[list[float]] = [[] for _ in projectors]

    class Turn(transformers.TrainerCallback):
        def __init__(self, k: int) -> None:
            self.k, self.t0 = k, 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            baton.hold(self.k)
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times[self.k].append(time.perf_counter() - self.t0)
            bar.update(1)
            baton.release(self.k)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            baton.release(self.k, finished=True)

    data = make_data(opts.batch * opts.steps, opts.vocab)
    with tempfile.TemporaryDirectory() as out:
        trainers = []
        for k, proj in enumerate(projectors):
            callbacks: list = [Turn(k)]  # last: its step window covers the sketch's events
            train = data
            if proj is not None:
                callbacks.insert(0, SketchCallback(sa.CausalLMTask(), projector=proj, m=opts.m))
                train = IndexedDataset(data)
            args = transformers.TrainingArguments(
                output_dir=os.path.join(out, str(k)), max_steps=opts.steps, per_device_train_batch_size=opts.batch,
                learning_rate=3e-4, remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
            trainers.append(transformers.Trainer(model=make_model(opts.layers, opts.width, opts.vocab), args=args,
                                                 train_dataset=train, data_collator=sa.PadCollator(), callbacks=callbacks))

        def work(k: int) -> None:
            try:
                trainers[k].train()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                baton.fail(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(projectors))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if baton.error is not None:
        raise baton.error
    return times


def loop_run(opts: argparse.Namespace, projectors: list[str | None], bar: tqdm) -> list[list[float]]:
    """Step times ``[variant][step]`` of custom loops (plain for None, else inside TrainTimeSketcher.step), interleaved."""
    import contextlib

    import sketchattr as sa
    from sketchattr.featurize.train_time import TrainTimeSketcher

    data, collate = make_data(opts.batch * opts.steps, opts.vocab), sa.PadCollator()
    models = [make_model(opts.layers, opts.width, opts.vocab).train() for _ in projectors]
    opts_ = [torch.optim.AdamW(m.parameters(), lr=3e-4) for m in models]
    sketchers = [TrainTimeSketcher(m, sa.CausalLMTask(), projector=p, m=opts.m) if p else None for m, p in zip(models, projectors)]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in projectors]
    for step in range(opts.steps):
        idx = order[step * opts.batch : (step + 1) * opts.batch]
        batch = collate([data[i] for i in idx.tolist()])
        for k, (model, opt, sketcher) in enumerate(zip(models, opts_, sketchers)):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with sketcher.step(batch, idx) if sketcher is not None else contextlib.nullcontext():
                model(**batch).loss.backward()  # Hugging Face's mean next-token loss
            opt.step()
            times[k].append(time.perf_counter() - t0)
            bar.update(1)
    for s in sketchers:
        if s is not None:
            s.close()
    return times


def overhead(times: list[float], plain: list[float], warmup: int) -> float:
    """Median over steps (after ``warmup``) of the step-time ratio to the plain step of the same round, minus 1."""
    return statistics.median(t / p for t, p in list(zip(times, plain))[warmup:]) - 1


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers of width 128, 20 steps, 2 runs (< 1 minute)")
    parser.add_argument("--reps", type=int, default=None, help="runs (default 3; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; --quick 20)")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed at the start of a run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--m", type=int, default=2048, help="sketch size")
    parser.add_argument("--projectors", nargs="+", default=["factgrass", "sjlt"])
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    opts.reps = opts.reps or (2 if opts.quick else 3)
    opts.steps = opts.steps or (20 if opts.quick else 40)
    opts.layers, opts.width, opts.vocab = (2, 128, 1024) if opts.quick else (4, 256, 2048)
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    n_params = sum(p.numel() for p in make_model(opts.layers, opts.width, opts.vocab).parameters())
    loops = {"Trainer": (trainer_run, [None, *opts.projectors]), "custom loop": (loop_run, [None, opts.projectors[0]])}
    total = opts.reps * opts.steps * sum(len(v) for _, v in loops.values())
    results: dict[tuple[str, str | None], dict[str, list[float]]] = {}
    with tqdm(total=total, desc="steps", unit="step") as bar:
        for _ in range(opts.reps):
            for loop, (run, variants) in loops.items():
                times = run(opts, variants, bar)
                for proj, t in zip(variants, times):
                    r = results.setdefault((loop, proj), {"rate": [], "overhead": []})
                    r["rate"].append(1 / statistics.median(t[opts.warmup:]))
                    r["overhead"].append(overhead(t, times[0], opts.warmup))
    print(f"\nGPT-2 {opts.layers} layers x {opts.width}, vocabulary {opts.vocab}: {n_params / 1e6:.2f}M parameters, "
          f"batch {opts.batch} x 32-64 tokens, every step sketched (m = {opts.m}), {opts.threads} thread(s), "
          f"{opts.steps} steps a run ({opts.warmup} untimed), median of {opts.reps} runs\n")
    print("| loop | store built while training | steps/s | overhead (runs) |")
    print("| --- | --- | --- | --- |")
    summary: dict[str, dict[str, float]] = {}
    for (loop, proj), r in results.items():
        label = "none (plain training)" if proj is None else f"{proj}, m = {opts.m}"
        runs = ", ".join(f"{100 * o:+.0f}%" for o in r["overhead"])
        cell = "—" if proj is None else f"**{100 * statistics.median(r['overhead']):+.1f}%** ({runs})"
        print(f"| {loop} | {label} | {statistics.median(r['rate']):.2f} | {cell} |")
        summary[f"{loop}/{proj or 'plain'}"] = {"steps_per_s": statistics.median(r["rate"]), "overhead": statistics.median(r["overhead"])}
    return summary


if __name__ == "__main__":
    main()
