"""WinCLIP (zero-shot, §4.1-4.2) and WinCLIP+ (K normal shots, §4.3) on an open_clip ViT.

Shapes: B queries, K references, N windows, P = gh*gw patches, D tower width, E joint embedding.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .association import associate, text_scores
from .backbone import ClipBackbone
from .config import WinClipConfig
from .features import ImageFeatures, ReferenceMemory
from .loading import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedClip, Precision, load_clip
from .lru import LRU
from .prompting import PromptEnsemble, build_ensemble
from .windows import aggregate_windows, combine_scales, window_indices

PROTOTYPE_CACHE_SIZE = 16  # prompt sets kept; a playground edit-and-revert hits the cache
PROMPT_CACHE_SIZE = 8192  # single prompt embeddings kept (~2.6 kB each at E=640)


@dataclass(frozen=True)
class WinClipOutput:
    """Scores of a batch. Maps are on the patch grid (B, gh, gw), before upsampling."""

    image_scores: torch.Tensor  # (B,) final: zero-shot, or eq. 6 with references
    grid_maps: torch.Tensor  # (B, gh, gw) final: zero-shot, or its mean with the few-shot map
    zero_shot_scores: torch.Tensor  # (B,) class-token score (AC)
    zero_shot_maps: torch.Tensor  # (B, gh, gw) multi-scale zero-shot map
    zero_shot_components: dict[str, torch.Tensor]  # "image", "window_2", "window_3" -> (B, gh, gw)
    few_shot_maps: torch.Tensor | None = None  # (B, gh, gw) eq. 5, None without references
    few_shot_components: dict[str, torch.Tensor] = field(default_factory=dict)  # "patch", "window_k"
    shots: int = 0  # K references used


@dataclass(frozen=True)
class Prediction:
    """One image. Maps are float32 arrays (H, W) at the size asked of ``to_prediction`` (``predict``: the
    image's own), values in [0, 1]."""

    score: float
    anomaly_map: np.ndarray  # (H, W)
    zero_shot_score: float
    zero_shot_map: np.ndarray  # (H, W)
    few_shot_map: np.ndarray | None  # (H, W), None in zero-shot mode
    components: dict[str, np.ndarray]  # "zero_shot/window_2", "few_shot/patch", ... -> (H, W)
    grid_map: np.ndarray  # (gh, gw) final map before upsampling
    shots: int


class _Current:
    """The default of ``WinClip.score``'s references: the detector's own (``set_references``)."""

    def __repr__(self) -> str:
        return "CURRENT"


CURRENT = _Current()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) -> (B, H, W), bilinear (no smoothing, as in every reproduction)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def map_at(grid_maps: torch.Tensor, size: tuple[int, int], index: int = 0) -> np.ndarray:
    """Item ``index`` of (B, gh, gw) grid maps upsampled to ``size`` (H, W) and clipped to [0, 1]."""
    return upsample(grid_maps[index : index + 1], size)[0].clamp(0, 1).cpu().numpy()


class WinClip:
    """WinCLIP / WinCLIP+ detector. Text prototypes cached per prompt set, memories per reference set."""

    def __init__(
        self,
        clip_model: torch.nn.Module,
        tokenizer,
        config: WinClipConfig = WinClipConfig(),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        import open_clip

        self.config = config
        self.backbone = ClipBackbone(clip_model, dtype)
        self.tokenizer = tokenizer
        pre = open_clip.get_model_preprocess_cfg(clip_model)
        size = pre.get("size", clip_model.visual.image_size)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(3, 1, 1)
        self.std = torch.tensor(pre.get("std", (0.26862954, 0.26130258, 0.27577711))).view(3, 1, 1)
        self.grid = self.backbone.grid
        self.windows = self._windows_for(config)
        self._prototype_cache = LRU(PROTOTYPE_CACHE_SIZE)  # prototypes_for(..., keep=True): never evicted
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.prompts: PromptEnsemble
        self.prototypes: torch.Tensor  # (2, E) [normal, anomalous]
        self.references: ReferenceMemory | None = None
        self.source: LoadedClip | None = None  # set by from_pretrained: model name, weights, dtype
        self.set_prompts()

    def _windows_for(self, config: WinClipConfig) -> dict[int, torch.Tensor]:
        """k -> (N_k, k*k) patch indices of every window of each configured scale."""
        for k in config.window_scales:
            if k > min(self.grid):
                raise ValueError(f"window scale {k} exceeds the model's {self.grid} patch grid")
        return {k: window_indices(self.grid, k, config.window_stride) for k in config.window_scales}

    @classmethod
    def from_pretrained(
        cls,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str = "cpu",
        config: WinClipConfig = WinClipConfig(),
        precision: Precision = "fp32",
        seed: int = 0,
        strict: bool = False,
        compile_int8: bool = True,
    ) -> "WinClip":
        """Load an open_clip model. ``pretrained``: tag, local weights file, or None (seeded random init).
        ``source.runtime`` says which device and precision ``auto`` resolved to, and why; ``strict``
        refuses emulated CPU bf16 instead of warning. ``compile_int8=False`` keeps the int8 path's float
        steps eager (compiling them costs 6-34 s once and saves ~0.1-0.25 s per pass)."""
        loaded = load_clip(model_name, pretrained, device, precision, seed, strict)
        detector = cls(loaded.model, loaded.tokenizer, config, loaded.dtype)
        detector.source = loaded
        detector.backbone.compile_int8 = compile_int8
        if loaded.runtime.precision == "int8":
            detector.backbone.use_int8(True)
        return detector

    # ---- text side ---------------------------------------------------------------------------

    def set_prompts(
        self,
        object_name: str = "object",
        defect_words: Sequence[str] = (),
        normal_states: Sequence[str] | None = None,
        anomalous_states: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
    ) -> PromptEnsemble:
        """Build the prompt ensemble and its [normal, anomalous] prototypes (cached per prompt set)."""
        cfg = self.config
        if not cfg.state_ensemble:
            normal_states = normal_states or (cfg.baseline_normal_state,)
            anomalous_states = anomalous_states or (cfg.baseline_anomalous_state,)
        if not cfg.template_ensemble:
            templates = templates or (cfg.baseline_template,)
        ensemble = build_ensemble(
            object_name, defect_words, normal_states, anomalous_states, templates, cfg.max_defect_words
        )
        self.prototypes = self.prototypes_for(ensemble)
        self.prompts = ensemble
        return ensemble

    def prototypes_for(self, ensemble: PromptEnsemble, keep: bool = False) -> torch.Tensor:
        """(2, E) mean text embedding of the normal and of the anomalous prompts (cached; ``keep``: for good)."""
        def compute() -> torch.Tensor:
            both = self.encode_prompts((*ensemble.normal, *ensemble.anomalous))  # one tree: they share templates
            normal, anomalous = both[: len(ensemble.normal)], both[len(ensemble.normal):]  # (Tn, E), (Ta, E)
            if self.config.prototype == "mean_normalized":
                normal, anomalous = F.normalize(normal, dim=-1), F.normalize(anomalous, dim=-1)
            return torch.stack([normal.mean(dim=0), anomalous.mean(dim=0)])  # (2, E)

        return self._prototype_cache.get((ensemble.normal, ensemble.anomalous, self.config.prototype), compute, keep)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(T,) prompts -> (T, E) raw text embeddings (cached per prompt, least recently used evicted); rejects
        over-long prompts."""
        cache = self._prompt_cache
        todo = [p for p in dict.fromkeys(prompts) if p not in cache]
        if todo:
            self._check_token_lengths(todo)
            cache.update(zip(todo, self.backbone.encode_text(self.tokenizer(todo))))  # in prefix-tree calls
        embeddings = torch.stack([cache[p] for p in prompts])
        for prompt in dict.fromkeys(prompts):  # used now: evicted last
            cache.move_to_end(prompt)
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
        return embeddings

    def _check_token_lengths(self, prompts: Sequence[str]) -> None:
        encode = getattr(self.tokenizer, "encode", None)
        limit = getattr(self.tokenizer, "context_length", 77)
        if encode is None:
            return
        for prompt in dict.fromkeys(prompts):
            n_tokens = len(encode(prompt)) + 2  # + start and end tokens
            if n_tokens > limit:
                raise ValueError(
                    f"prompt {prompt!r} is {n_tokens} tokens; CLIP reads at most {limit}. "
                    "Shorten the object name or defect word."
                )

    # ---- image side --------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W): squash-resize to the model's size (bicubic, no crop), CLIP mean/std."""
        rgb = image.convert("RGB")
        h, w = self.image_size
        resized = rgb.resize((w, h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        return (pixels - self.mean) / self.std

    def _as_pixels(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            pixels = images
        else:
            images = list(images)
            if not all(isinstance(im, Image.Image) for im in images):
                raise ValueError("images must be PIL images or a preprocessed (K, 3, H, W) tensor")
            pixels = torch.stack([self.preprocess(im) for im in images]) if images else torch.empty(0)
        if pixels.numel() and (pixels.ndim != 4 or pixels.shape[1] != 3):
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        if pixels.numel() and tuple(pixels.shape[-2:]) != self.image_size:
            raise ValueError(
                f"pixels are {tuple(pixels.shape[-2:])}, the model needs {self.image_size}; use .preprocess()"
            )
        return pixels

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, layers: tuple[int, ...] = ()) -> ImageFeatures:
        """(B, 3, H, W) -> class embeddings, patch tokens and window embeddings of every scale; with
        ``layers`` also those blocks' raw patch tokens from the same pass (MuSc, winclip.musc)."""
        pixels = self._as_pixels(pixels)
        full, windows = self.backbone.encode_all(
            pixels, self.windows, self.config.max_tokens_per_call, self.config.packed, tuple(layers)
        )
        return ImageFeatures(full.image_embeddings, full.patch_tokens, windows, full.layer_tokens)

    @torch.inference_mode()
    def memory_for(self, images: Sequence[Image.Image] | torch.Tensor) -> ReferenceMemory | None:
        """WinCLIP+ memories of K normal images (R^P and R^W per scale); empty -> None. Leaves state alone."""
        pixels = self._as_pixels(images)
        if pixels.numel() == 0:
            return None
        key = hashlib.sha1(pixels.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        if self.references is not None and self.references.key == key:
            return self.references
        return ReferenceMemory.from_features(self.encode(pixels), key)

    def set_references(self, images: Sequence[Image.Image] | torch.Tensor) -> ReferenceMemory | None:
        """Use K normal images as references (memories computed once per reference set); empty -> zero-shot."""
        self.references = self.memory_for(images)
        return self.references

    def with_config(self, config: WinClipConfig) -> "WinClip":
        """A detector with other settings on the same model, sharing the text-prototype cache.

        Prompts carry over; references do not (their memories depend on the window scales).
        """
        other = copy.copy(self)
        other.config = config
        other.windows = self._windows_for(config)
        other.references = None
        other.prototypes = other.prototypes_for(self.prompts)
        return other

    @torch.inference_mode()
    def leave_one_out_scores(
        self, references: ReferenceMemory | None = None, prototypes: torch.Tensor | None = None
    ) -> list[float]:
        """Score of each shot with the other K-1 shots as references (needs K >= 2).

        What a normal image scores under this setup: the basis of the demo's suggested threshold.
        """
        refs = self.references if references is None else references
        if refs is None or refs.shots < 2:
            raise ValueError("leave-one-out scores need at least 2 reference images")
        return [
            float(self.score(refs.shot(i), prototypes, refs.without(i)).image_scores[0]) for i in range(refs.shots)
        ]

    # ---- scoring -----------------------------------------------------------------------------

    @torch.inference_mode()
    def class_scores(self, feats: ImageFeatures, prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) zero-shot image scores: the class token against the text prototypes (§4.1), as ``score``
        computes them first; without its window maps (a prompt edit's image AUROC needs only these)."""
        protos = self.prototypes if prototypes is None else prototypes
        return text_scores(feats.image_embeddings, protos, self.config.temperature, self.config.scoring)

    @torch.inference_mode()
    def score(
        self,
        feats: ImageFeatures,
        prototypes: torch.Tensor | None = None,
        references: "ReferenceMemory | None | _Current" = CURRENT,
    ) -> WinClipOutput:
        """Zero-shot scores (eq. 3 + multi-scale) and, with references, WinCLIP+ fusion (eqs. 4-6).

        ``prototypes`` / ``references`` default to the detector's current ones; pass them to score
        without touching the detector's state (references=None forces zero-shot).
        """
        cfg = self.config
        protos = self.prototypes if prototypes is None else prototypes
        refs = self.references if references is CURRENT else references
        batch = feats.image_embeddings.shape[0]
        zs_scores = self.class_scores(feats, protos)  # (B,)
        zs_parts: dict[str, torch.Tensor] = {}
        if cfg.image_scale:
            zs_parts["image"] = zs_scores[:, None, None].expand(batch, *self.grid)  # (B, gh, gw)
        for k, emb in feats.window_embeddings.items():
            window_scores = text_scores(emb, protos, cfg.temperature, cfg.scoring)  # (B, N)
            zs_parts[f"window_{k}"] = aggregate_windows(window_scores, self.grid, self.windows[k], cfg.aggregation)
        zs_map = combine_scales(list(zs_parts.values()), cfg.aggregation)  # (B, gh, gw)
        if refs is None:
            return WinClipOutput(zs_scores, zs_map, zs_scores, zs_map, zs_parts)

        fs_parts: dict[str, torch.Tensor] = {}
        if cfg.few_shot_patch_memory:
            fs_parts["patch"] = associate(feats.patch_tokens, refs.patch).reshape(batch, *self.grid)
        for k, emb in feats.window_embeddings.items():
            fs_parts[f"window_{k}"] = aggregate_windows(
                associate(emb, refs.windows[k]), self.grid, self.windows[k], cfg.aggregation
            )
        if not fs_parts:
            raise ValueError("few-shot mode has no memory: enable few_shot_patch_memory or window_scales")
        fs_map = torch.stack(list(fs_parts.values())).mean(dim=0)  # eq. 5, (B, gh, gw)
        final_map = (zs_map + fs_map) / 2
        final_scores = (zs_scores + fs_map.amax(dim=(-2, -1))) / 2  # eq. 6
        return WinClipOutput(final_scores, final_map, zs_scores, zs_map, zs_parts, fs_map, fs_parts, refs.shots)

    def forward(self, pixels: torch.Tensor) -> WinClipOutput:
        """(B, 3, H, W) preprocessed pixels -> scores and grid maps."""
        return self.score(self.encode(pixels))

    __call__ = forward

    def predict(self, image: Image.Image) -> Prediction:
        """One PIL image -> score in [0, 1] and anomaly map at the image's own size."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"predict takes a PIL image, got {type(image).__name__}")
        out = self.forward(self.preprocess(image)[None])
        return self.to_prediction(out, (image.height, image.width))

    def to_prediction(self, out: WinClipOutput, size: tuple[int, int], index: int = 0) -> Prediction:
        """Item ``index`` of a batch result as a ``Prediction`` with maps upsampled to ``size`` (H, W)."""

        def up(grid_map: torch.Tensor) -> np.ndarray:
            return map_at(grid_map, size, index)

        components = {f"zero_shot/{k}": up(v) for k, v in out.zero_shot_components.items()}
        components.update({f"few_shot/{k}": up(v) for k, v in out.few_shot_components.items()})
        return Prediction(
            score=float(out.image_scores[index]),
            anomaly_map=up(out.grid_maps),
            zero_shot_score=float(out.zero_shot_scores[index]),
            zero_shot_map=up(out.zero_shot_maps),
            few_shot_map=None if out.few_shot_maps is None else up(out.few_shot_maps),
            components=components,
            grid_map=out.grid_maps[index].float().cpu().numpy(),
            shots=out.shots,
        )
