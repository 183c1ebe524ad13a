"""The image tower's fast kernels, walled off from the open_clip adapter (``winclip.backbone``): the packed
pass and its float kernels (``packed``), the CPU int8 path (``int8``, ``int8_epilogue``). Nothing here imports
the rest of winclip except ``hardware`` and ``settings``."""

from .int8 import Int8Kernel, Int8Linear, Int8Tower, int8_kernel, int8_unavailable
from .packed import FLOAT, FUSED_BF16, FloatKernel, fusable, packable, packed_pass
from .towers import PRECISION_DTYPES, PRECISION_NAMES, Towers

__all__ = ["FLOAT", "FUSED_BF16", "FloatKernel", "Int8Kernel", "Int8Linear", "Int8Tower", "fusable", "int8_kernel",
           "int8_unavailable", "packable", "packed_pass", "PRECISION_DTYPES", "PRECISION_NAMES", "Towers"]
