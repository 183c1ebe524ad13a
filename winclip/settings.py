"""Every ``WINCLIP_*`` environment variable, read in one place, and the model settings they give.

The CLI's flags default to these and the app reads them at start; nothing else parses them. Table:

| variable | meaning | default |
|---|---|---|
| WINCLIP_MODEL | open_clip model name or a model-config JSON | ViT-B-16-plus-240 |
| WINCLIP_PRETRAINED | open_clip tag, local weights file, or `none` (random init, tests only) | laion400m_e31 |
| WINCLIP_DEVICE | auto, cpu, cuda[:N] | auto |
| WINCLIP_PRECISION | auto, fp32, bf16, fp16, int8 | auto |
| WINCLIP_LOAD_WAIT | seconds a request waits for a (first-run) load | 600 |
| WINCLIP_OUTPUT_HOURS | the app's uploads and results on the server are deleted after this many hours | 6 |
| WINCLIP_CACHE | folder of the precision self-check's verdicts | ~/.cache/winclip |
| WINCLIP_INT8_COMPILE | 0: the int8 path's float steps stay eager | 1 |
| WINCLIP_MALLOC_TUNING | 0: leave glibc's allocator settings alone | 1 |
| WINCLIP_MALLOC_ARENAS | malloc arenas (0: glibc's default) | 2 |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MODEL = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e31"  # the paper's weights (LAION-400M, epoch 31)
DEFAULTS = {
    "WINCLIP_MODEL": DEFAULT_MODEL,
    "WINCLIP_PRETRAINED": DEFAULT_PRETRAINED,
    "WINCLIP_DEVICE": "auto",
    "WINCLIP_PRECISION": "auto",
    "WINCLIP_LOAD_WAIT": "600",
    "WINCLIP_OUTPUT_HOURS": "6",
    "WINCLIP_CACHE": "",
    "WINCLIP_INT8_COMPILE": "1",
    "WINCLIP_MALLOC_TUNING": "1",
    "WINCLIP_MALLOC_ARENAS": "2",
}


def env(name: str, environ: Mapping[str, str] | None = None) -> str:
    """A WINCLIP_* variable, stripped; its default when unset or blank."""
    if name not in DEFAULTS:
        raise KeyError(f"{name} is not a winclip setting; known: {', '.join(DEFAULTS)}")
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or DEFAULTS[name]


def switched_on(name: str) -> bool:
    """A 0/1 switch (WINCLIP_INT8_COMPILE, WINCLIP_MALLOC_TUNING)."""
    return env(name) != "0"


def parse_pretrained(text: str | None) -> str | None:
    """'none' (any case) or empty -> None (random init, tests only); a tag or a path otherwise."""
    if text is None:
        return None
    text = str(text).strip()
    return None if text.lower() in ("none", "") else text


@dataclass(frozen=True)
class Settings:
    """Which model, weights, device and precision: from WINCLIP_MODEL, WINCLIP_PRETRAINED, WINCLIP_DEVICE
    and WINCLIP_PRECISION (``from_env``) or the CLI's flags."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED  # None = random init, tests only
    device: str = "auto"  # auto: CUDA when present, else CPU (winclip.hardware)
    precision: str = "auto"  # auto: fp32 first, then a reduced precision once it matched fp32 here
    # (winclip.precision_check): bf16 on bf16 GPUs and AVX512-BF16/AMX CPUs, fp16 on other GPUs, int8 on other x86

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        raw = (os.environ if environ is None else environ).get("WINCLIP_PRETRAINED", DEFAULT_PRETRAINED)
        return cls(model=env("WINCLIP_MODEL", environ), pretrained=parse_pretrained(raw),  # set but blank: none
                   device=env("WINCLIP_DEVICE", environ), precision=env("WINCLIP_PRECISION", environ))
