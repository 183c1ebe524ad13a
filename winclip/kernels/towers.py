"""The image tower per precision: the loaded tower, reduced-precision copies of an fp32 tower made on demand,
the int8 weights, the shared precision and per-thread overrides, and the kernel a pass runs on.

``ClipBackbone`` is one of these: the precision self-check compares copies in one process, MuSc may keep
fp32 while WinCLIP runs bf16, and a batch run keeps the precision it started with while ``auto`` switches.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import torch
from torch import nn

from .int8 import Int8Tower, int8_kernel, int8_unavailable
from .packed import FLOAT, FUSED_BF16, FloatKernel, fusable

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Towers:
    def __init__(self, visual: nn.Module, dtype: torch.dtype) -> None:
        visual.to(dtype)
        self._towers: dict[torch.dtype, nn.Module] = {dtype: visual}
        self._dtype = dtype  # the shared setting; precision_for_this_thread overrides it for one thread
        self._fused: dict[torch.dtype, bool] = {}
        self._this_thread = threading.local()  # precision overrides seen by one thread only
        self.int8: Int8Tower | None = None  # set by use_int8: the packed path's linears in int8 (CPU)
        self._int8_weights: Int8Tower | None = None  # made on first use, kept across switches
        # compile the int8 path's float steps when its weights are made (seconds, paid back after a few
        # dozen passes: a server or a batch run, not a single prediction)
        self.compile_int8 = True

    @property
    def device(self) -> torch.device:
        return next(next(iter(self._towers.values())).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The image tower's dtype for this thread's passes."""
        return getattr(self._this_thread, "dtype", None) or self._dtype

    @property
    def visual(self) -> nn.Module:
        """The image tower this thread's passes use (fp32, or a bf16/fp16 copy)."""
        return self.tower(self.dtype)

    @property
    def fused(self) -> bool:
        """Whether this thread's passes take oneDNN's fused bf16 linears (see ``fusable``)."""
        dtype = self.dtype
        if dtype not in self._fused:
            self._fused[dtype] = fusable(self.tower(dtype), dtype)
        return self._fused[dtype]

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused[self.dtype] = value

    @property
    def precision(self) -> str:
        """'fp32', 'bf16', 'fp16' or 'int8': what this thread's passes run in."""
        return "int8" if self.active_int8() is not None else PRECISION_NAMES[self.dtype]

    def tower(self, dtype: torch.dtype) -> nn.Module:
        if dtype not in self._towers:
            master = self._towers.get(torch.float32)
            if master is None:
                loaded = PRECISION_NAMES[next(iter(self._towers))]
                raise ValueError(f"the image tower was loaded in {loaded}; a {PRECISION_NAMES[dtype]} copy needs "
                                 "the fp32 weights (load with precision auto or fp32)")
            self._towers[dtype] = copy.deepcopy(master).to(dtype).eval()
        return self._towers[dtype]

    def prepare(self, precision: str) -> None:
        """Make what ``precision`` runs on now (a reduced-precision copy of the tower, or the int8
        weights and their compiled steps: seconds), e.g. before taking a server's lock."""
        if precision == "int8":
            self.prepare_int8()
        else:
            self.tower(PRECISION_DTYPES[precision])

    def use_precision(self, precision: str) -> None:
        """Every thread's passes run in ``precision`` from now on (fp32, bf16, fp16 or int8)."""
        self.prepare(precision)
        self._dtype = PRECISION_DTYPES[precision]
        self.use_int8(precision == "int8")

    @contextlib.contextmanager
    def precision_for_this_thread(self, precision: str | None):
        """Within the block this thread's passes run in ``precision`` whatever ``use_precision`` says
        (None: no override); other threads keep the shared setting."""
        if precision is None:
            yield
            return
        self.prepare(precision)
        previous = (getattr(self._this_thread, "dtype", None), getattr(self._this_thread, "int8", None))
        self._this_thread.dtype = PRECISION_DTYPES[precision]
        self._this_thread.int8 = self.int8_tower() if precision == "int8" else False
        try:
            yield
        finally:
            self._this_thread.dtype, self._this_thread.int8 = previous

    def use_int8(self, enabled: bool = True) -> None:
        """Run the packed path's linear layers in int8 (see ``Int8Tower``) or back in float. The int8
        weights are made once and kept (about a quarter of the tower's float weights)."""
        self.int8 = self.int8_tower() if enabled else None

    def prepare_int8(self) -> None:
        """Make the int8 weights and compile the int8 path's float steps now (seconds; ValueError where
        int8 cannot run), so that the first int8 pass does not, e.g. while holding a server's lock."""
        self.int8_tower()

    def int8_tower(self) -> "Int8Tower":
        """The int8 weights, made on first use; ValueError where int8 cannot run."""
        if self._int8_weights is None:
            master = self._towers.get(torch.float32)
            problem = int8_unavailable(master if master is not None else self.visual,
                                       torch.float32 if master is not None else self._dtype, self.device)
            if problem:
                raise ValueError(f"int8 is not available here: {problem}")
            self._int8_weights = Int8Tower(master, self.compile_int8)
        return self._int8_weights

    def active_int8(self) -> "Int8Tower | None":
        """The int8 weights this thread's passes use now (None: float)."""
        override = getattr(self._this_thread, "int8", None)
        if override is None:
            return self.int8
        return override or None

    def kernel(self) -> FloatKernel:
        """The kernel this thread's packed passes run every block on, chosen once per pass."""
        if self.device.type == "cpu":
            int8 = self.active_int8()
            if int8 is not None:
                return int8_kernel(int8)
            if self.fused:
                return FUSED_BF16
        return FLOAT
