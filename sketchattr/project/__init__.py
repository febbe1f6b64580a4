"""Random gradient projectors (sketches) ``g -> P g``, seeded and generated block by block.

>>> from sketchattr.project import make_projector
>>> proj = make_projector("sjlt", m=4096, seed=0, c=1)
>>> sketch = proj.project([g_module0, g_module1])      # [B, 4096]

Types: ``identity``, ``gaussian`` (alias ``normal``), ``rademacher``, ``sjlt`` (alias
``sparse``), ``factorized`` (Kronecker sketch of Linear/Conv2d gradients from the layer factors;
``make_projector("factorized", m_out=32, m_in=32)`` or ``m=1024`` per module), ``factgrass``
(masked Kronecker factors mixed by an SJLT into ``m``), ``tensorsketch`` (a count sketch of every
block with a Kronecker-split hash, computed from the layer factors by FFT).  ``spec()`` is the JSON-able identity of a sketch (store metadata).

May import :mod:`sketchattr.core` only: a projector maps a batch's gradients (a
:class:`~sketchattr.core.capture.Capture`) to rows and knows nothing of the engine that made them.
"""
from sketchattr.project.base import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CACHE_BYTES,
    ChunkedProjector,
    Projector,
    block_seed,
    make_projector,
)
from sketchattr.project.dense import DenseProjector, GaussianProjector, RademacherProjector
from sketchattr.project.factgrass import FactGraSSProjector
from sketchattr.project.factorized import FactorizedProjector
from sketchattr.project.identity import IdentityProjector
from sketchattr.project.sjlt import SJLTProjector, sjlt_cuda_available
from sketchattr.project.tensorsketch import TensorSketchProjector

__all__ = [
    "Projector",
    "ChunkedProjector",
    "DenseProjector",
    "FactGraSSProjector",
    "FactorizedProjector",
    "IdentityProjector",
    "GaussianProjector",
    "RademacherProjector",
    "SJLTProjector",
    "TensorSketchProjector",
    "block_seed",
    "make_projector",
    "sjlt_cuda_available",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CACHE_BYTES",
]
