"""Model loading: the only place that downloads (open_clip / Hugging Face Hub cache) or reads weights.

``pretrained`` is an open_clip tag (downloaded once, cached by huggingface_hub), a local weights file
(.safetensors, or a torch checkpoint read with ``weights_only=True``: no pickled code runs), or None
for random init (tests and timing only).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .kernels import PRECISION_DTYPES
from .hardware import Runtime, choose_runtime

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
# int8: float32 model whose image-tower linears run in int8 on the packed path (kernels.int8.Int8Tower)
DTYPES: dict[str, torch.dtype] = PRECISION_DTYPES
from .settings import DEFAULT_MODEL, DEFAULT_PRETRAINED, parse_pretrained  # noqa: E402  (one source)
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HOW_TO_SUPPLY = (
    "Download the weights on a machine with internet access, e.g. `hf download "
    "timm/vit_base_patch16_plus_clip_240.laion400m_e31 open_clip_model.safetensors --local-dir weights` "
    "(or open_clip_pytorch_model.bin), then pass the file: `--pretrained weights/open_clip_model.safetensors` "
    "(CLI) or WINCLIP_PRETRAINED=weights/open_clip_model.safetensors (app)."
)

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Weights could not be obtained or do not fit the model; the message says what to do."""


@dataclass(frozen=True)
class LoadedClip:
    model: nn.Module
    tokenizer: Any
    model_name: str
    pretrained: str | None  # tag, resolved file path, or None for random init
    dtype: torch.dtype
    runtime: Runtime  # the device and precision in use, and why
    model_ref: str = ""  # the model as asked for: an open_clip name or a model-config JSON path (to load it again)


def resolve_model_name(model_name: str) -> str:
    """A registered open_clip name, or a path to a model-config JSON (registered here under its stem)."""
    import open_clip

    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise ValueError(f"model config file not found: {model_name}")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; use a name from open_clip.list_models() "
            f"(default {DEFAULT_MODEL}) or a path to a model-config .json"
        )
    return model_name


def is_weights_path(pretrained: str) -> bool:
    return Path(pretrained).expanduser().is_file() or "/" in pretrained or pretrained.endswith(WEIGHTS_SUFFIXES)


def resolve_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("precision 'fp16' needs a CUDA device; on CPU use 'bf16' (fast) or 'fp32' (reference)")
    return DTYPES[precision]


def load_clip(
    model_name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    seed: int = 0,
    strict: bool = False,
) -> LoadedClip:
    """Create the open_clip model and tokenizer; raise ``WeightsError`` with a remedy on failure.
    ``strict``: refuse emulated CPU bf16 (the app and CLI) instead of warning (see ``choose_runtime``)."""
    import open_clip

    runtime = choose_runtime(str(device), precision, strict=strict)  # "auto" resolved, with its reason
    name = resolve_model_name(model_name)
    device = runtime.device
    dtype = resolve_dtype(runtime.precision, device)
    pretrained = parse_pretrained(pretrained)  # "none" or "" -> random init
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random init is reproducible: same seed, same weights
            model = place(open_clip.create_model(name, pretrained=None, device="cpu"), device)
        source = None
    elif is_weights_path(pretrained):
        source = str(Path(pretrained).expanduser().resolve())
        model = _from_file(open_clip, name, source, device)
    else:
        source = pretrained
        model = _from_tag(open_clip, name, pretrained, device)
    return LoadedClip(model.eval(), open_clip.get_tokenizer(name), name, source, dtype, runtime, str(model_name))


def place(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move every parameter and buffer of ``model`` to ``device`` and check that they all went.

    Models are built and read on the CPU, then moved once: ``load_state_dict(assign=True)`` keeps the
    file's CPU tensors, so creating the model on the device first would leave its weights behind (and
    under ZeroGPU only tensors moved to "cuda" in the main process are packed for the GPU).
    """
    model.to(device)
    wrong = misplaced(model, device)
    if wrong:
        raise RuntimeError(f"{len(wrong)} tensors of the model are not on {device} after loading "
                           f"(e.g. {', '.join(wrong[:3])})")
    return model


def misplaced(model: nn.Module, device: str | torch.device) -> list[str]:
    """'name (device)' of every parameter and buffer that is not on ``device`` ("cuda" matches any cuda:N)."""
    want = torch.device(device)
    out = []
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        have = tensor.device
        if have.type != want.type or (want.index is not None and have.index not in (want.index, None)):
            out.append(f"{name} ({have})")
    return out


def _from_file(open_clip: Any, name: str, path: str, device: str | torch.device) -> nn.Module:
    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"weights file not found: {path}. {HOW_TO_SUPPLY}")
    if file.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}. Download it again. {HOW_TO_SUPPLY}")
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_random_init_notice)  # open_clip's "initialized randomly" is untrue here
    try:
        with skip_random_init():  # every weight comes from the file; see skip_random_init
            model = open_clip.create_model(name, pretrained=None, device="cpu")  # moved once, below
    finally:
        root_logger.removeFilter(_drop_random_init_notice)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing: unreadable file
        raise WeightsError(
            f"cannot read weights file {path} ({type(exc).__name__}: {_first_line(exc)}). It may be truncated "
            f"or not a weights file; download it again. {HOW_TO_SUPPLY}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)  # take the loaded tensors, no copy
    except RuntimeError as exc:  # shape mismatches
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise WeightsError(
            f"weights in {path} do not fit model {name!r}: {detail[:300]}. "
            "Check that the file is for this model (WINCLIP_MODEL / --model)."
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights in {path} do not fit model {name!r}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]}). Check that the file is for this model (WINCLIP_MODEL / --model)."
        )
    return place(model, device)


RANDOM_FILLS = frozenset({"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "log_normal_",
                          "cauchy_", "geometric_"})


class _SkipRandomInit(TorchFunctionMode):
    """Torch-function mode: ``torch.nn.init.*`` and in-place random fills return the tensor untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if isinstance(target, torch.Tensor) and (
            getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", "") in RANDOM_FILLS
        ):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def skip_random_init():
    """Skip random initialisation while a model whose weights come from a file is built.

    Untouched parameter memory is never made resident, and ``load_state_dict(assign=True)`` swaps
    in the file's tensors, so a load peaks at one copy of the weights instead of two (and skips
    seconds of random number generation). A torch-function mode is thread-local: nothing is patched
    for the process, so another thread building modules meanwhile initialises them as usual. A
    parameter the file lacks is reported as missing, never left uninitialised.
    """
    with _SkipRandomInit():
        yield


def _drop_random_init_notice(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


HUB_PROBE_SECONDS = 5.0  # an unreachable Hub is reported after this, not after ~50 s of client retries
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_files(name: str, tag: str) -> tuple[str, tuple[str, ...]] | None:
    """(Hub repo, weight files in the order open_clip asks for them) for a Hub-hosted tag, else None.

    open_clip 3.x asks for the .safetensors twin of a ``.bin``/``.pth`` name first (``open_clip_model.
    safetensors`` for the default ``open_clip_pytorch_model.bin``), then the name itself. A Space must
    preload the first of these that the repository has (README front matter).
    """
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub)  # "org/repo/" names the repo with the default file name
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        names: tuple[str, ...] = (HF_SAFE_WEIGHTS_NAME, filename)
    elif filename.endswith((".bin", ".pth")):
        names = (filename[:-4] + ".safetensors", filename)
    else:
        names = (filename,)
    return repo_id, names


def _from_tag(open_clip: Any, name: str, tag: str, device: str | torch.device) -> nn.Module:
    known = open_clip.list_pretrained_tags_by_model(name)
    if tag not in known:
        raise ValueError(
            f"unknown pretrained tag {tag!r} for {name}; known tags: {known or 'none'}; "
            "or pass a local weights file"
        )
    if name == DEFAULT_MODEL and tag == "laion400m_e32":
        warnings.warn(
            "open_clip maps ViT-B-16-plus-240 'laion400m_e32' to the e31 Hub repo, so e31 weights load; "
            "use 'laion400m_e31' to say what you get",
            stacklevel=3,
        )
    hub = hub_files(name, tag)
    if hub is None:  # a tag with only a URL: open_clip's own download
        try:
            return place(open_clip.create_model(name, pretrained=tag, device="cpu"), device)
        except (OSError, RuntimeError, ValueError) as exc:
            raise WeightsError(f"could not download weights {name}/{tag} ({type(exc).__name__}: "
                               f"{_first_line(exc)}). {HOW_TO_SUPPLY}") from exc
    return _from_file(open_clip, name, hub_download(*hub, what=f"{name}/{tag}"), device)


def hub_download(repo_id: str, names: tuple[str, ...], what: str) -> str:
    """Path of the first of ``names`` in the Hub cache, downloading it if needed (huggingface_hub's client).

    The cache wins: a file already there is used without any request (also with HF_HUB_OFFLINE=1). A
    download goes to huggingface_hub's cache (a partial file stays ``.incomplete``, never counted as
    done). An unreachable Hub is reported after ``HUB_PROBE_SECONDS``.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for filename in names:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            log.info("weights %s from the Hub cache: %s", what, cached)
            return cached
    if constants.HF_HUB_OFFLINE:
        raise WeightsError(f"weights {what} are not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                           f"(looked for {', '.join(names)} of {repo_id}). {HOW_TO_SUPPLY}")
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT  # read now, not at import
    _probe_hub(endpoint, what)
    last: Exception | None = None
    for filename in names:
        try:
            return hf_hub_download(repo_id, filename, endpoint=endpoint)
        except RemoteEntryNotFoundError as exc:  # the repository has the other format
            last = exc
        except Exception as exc:  # noqa: BLE001 - network, HTTP and cache errors all mean: no weights
            raise WeightsError(f"could not download weights {what} ({filename} from {repo_id}: "
                               f"{type(exc).__name__}: {_first_line(exc)}). {HOW_TO_SUPPLY}") from exc
    raise WeightsError(f"could not download weights {what}: {repo_id} has none of {', '.join(names)} "
                       f"({_first_line(last) if last else 'no details'}). {HOW_TO_SUPPLY}")


def _probe_hub(endpoint: str, what: str) -> None:
    """Fail fast when the Hub's host cannot be reached (no DNS, no route, refused) or does not answer.

    A host that accepts connections and never answers (a captive proxy, a firewall) would hold the
    client for minutes (several attempts of a minute each; HF_HUB_ETAG_TIMEOUT does not bound them),
    so the probe asks for one HTTP response and gives up after ``HUB_PROBE_SECONDS`` in all.
    """
    import socket
    import ssl
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in PROXY_VARIABLES):  # the proxy decides; let the client try
        return
    url = urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    deadline = time.monotonic() + HUB_PROBE_SECONDS

    def left() -> float:
        return max(0.01, deadline - time.monotonic())

    try:
        sock = socket.create_connection((host, port), timeout=left())
    except OSError as exc:
        raise WeightsError(f"could not download weights {what}: the Hugging Face Hub at {endpoint} cannot be "
                           f"reached ({exc}). {HOW_TO_SUPPLY}") from exc
    try:
        if url.scheme == "https":
            sock.settimeout(left())
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        sock.settimeout(left())
        sock.sendall(f"HEAD /api/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        sock.settimeout(left())
        if not sock.recv(1):
            raise OSError("the connection was closed without an answer")
    except ssl.SSLError:
        return  # it answered (with TLS the client will judge); only silence is decided here
    except OSError as exc:
        silent = isinstance(exc, (socket.timeout, TimeoutError))
        raise WeightsError(
            f"could not download weights {what}: the Hugging Face Hub at {endpoint} "
            + (f"accepted the connection but did not answer within {HUB_PROBE_SECONDS:.0f} s" if silent
               else f"did not answer ({exc})")
            + f" (a proxy or firewall in the way?). {HOW_TO_SUPPLY}") from exc
    finally:
        sock.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return "no details"
    line = text.splitlines()[0]
    return line if len(line) <= 200 else line[:199] + "…"
