"""Shared building blocks that every stage may import; core imports nothing of sketchattr.

* :mod:`.registry` — ``Registered``, the ``__init_subclass__`` registry of every extension point
  (projectors, samplers, stores, scorers, layer rules);
* :mod:`.kronecker` and :mod:`.layout` — the Kronecker factors of a per-example gradient
  (``DenseFactor``, ``OneHotFactor``) and the matrix layouts of a block (``KronLayout``, ``FlatLayout``);
* :mod:`.capture` — the ``Capture`` protocol: what a projector reads of one batch's gradients;
* :mod:`.batches` — nested batches, datasets and the main process; :mod:`.checks` — argument checks;
* :mod:`.profiler` — per-stage timings; :mod:`.threads` — torch's thread count for a block of code.

Layers, bottom to top (ARCHITECTURE.md; enforced by import-linter): core < data | task <
project | sample < store < featurize < distributed < curvature < score < validate < integrations
< bench < cli.
"""
