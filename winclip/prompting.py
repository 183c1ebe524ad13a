"""Compositional prompt ensemble (CPE), WinCLIP §4.1.

Prompts = every state x every template with the object name substituted. States and templates are
data (``winclip/prompts/*.txt``, package data read with ``importlib.resources`` so an installed wheel
finds it; the top-level ``prompts/`` is a link to that folder). Pure text: no model here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PLACEHOLDER = "{}"
DEFECT_STATE_RULE = "{} with {defect}"  # "crack" -> "{} with crack"; a word holding "{}" is used as written
MAX_TEXT_CHARS = 200  # one object name or defect word; CLIP's 77 tokens run out well before this
MAX_LIST_ENTRIES = 64  # states per class or templates; bounds text-encoder work per request


@dataclass(frozen=True)
class PromptEnsemble:
    """The two prompt lists whose mean embeddings become the [normal, anomalous] prototypes."""

    normal: tuple[str, ...]
    anomalous: tuple[str, ...]


def prompt_data(name: str) -> Traversable:
    """A file shipped in the package's prompt data, e.g. ``prompt_data("templates.txt")``."""
    return resources.files("winclip").joinpath("prompts", name)


def read_prompt_file(path: str | Path | Traversable) -> tuple[str, ...]:
    """One entry per line; blank lines and lines starting with '#' are skipped."""
    source = Path(path) if isinstance(path, str) else path
    lines = source.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


@lru_cache(maxsize=None)
def default_lists() -> dict[str, tuple[str, ...]]:
    """The paper's 7 normal states, 4 anomalous states and 22 templates, from the package's prompt data."""
    return {
        "normal_states": read_prompt_file(prompt_data("normal_states.txt")),
        "anomalous_states": read_prompt_file(prompt_data("anomalous_states.txt")),
        "templates": read_prompt_file(prompt_data("templates.txt")),
    }


def clean_text(text: str, what: str) -> str:
    """Collapse whitespace; reject text that is too long to be a name or a defect word."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, got {type(text).__name__}")
    cleaned = " ".join(text.split())
    if len(cleaned) > MAX_TEXT_CHARS:
        raise ValueError(
            f"{what} is {len(cleaned)} characters long; keep it under {MAX_TEXT_CHARS} "
            f"(CLIP reads at most 77 tokens per prompt): {cleaned[:40]!r}..."
        )
    return cleaned


def defect_state(word: str) -> str:
    """A user defect word as an anomalous state: 'crack' -> '{} with crack'; 'bad soldering {}' kept."""
    word = clean_text(word, "defect word")
    if PLACEHOLDER in word:
        if word.count(PLACEHOLDER) != 1:
            raise ValueError(f"defect word {word!r} may contain '{{}}' (the object) at most once")
        return word
    return DEFECT_STATE_RULE.replace("{defect}", word)


def _checked(entries: Iterable[str], what: str) -> tuple[str, ...]:
    out = tuple(" ".join(str(e).split()) for e in entries)
    if not out:
        raise ValueError(f"{what} is empty; give at least one entry")
    if len(out) > MAX_LIST_ENTRIES:
        raise ValueError(f"{len(out)} {what} given; at most {MAX_LIST_ENTRIES} are allowed")
    for entry in out:
        if len(entry) > MAX_TEXT_CHARS:
            raise ValueError(f"one of {what} is {len(entry)} characters long; keep each under {MAX_TEXT_CHARS}")
    for entry in out:
        if entry.count(PLACEHOLDER) != 1:
            raise ValueError(f"each of {what} needs exactly one '{{}}' placeholder, got {entry!r}")
    return out


def _fill(pattern: str, value: str) -> str:
    # str.replace, not str.format: user text with braces must not be parsed as a format string.
    return pattern.replace(PLACEHOLDER, value, 1)


def build_ensemble(
    object_name: str = "object",
    defect_words: Sequence[str] = (),
    normal_states: Sequence[str] | None = None,
    anomalous_states: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    max_defect_words: int = 32,
) -> PromptEnsemble:
    """Every state x every template, object substituted; defect words become extra anomalous states.

    Order is state-major (all templates of state 1, then state 2, ...), like the public reproductions.
    Repeated states (e.g. a defect word given twice) are dropped, first kept, so none weighs twice;
    templates are used exactly as given (a caller's duplicate template is their weighting).
    """
    name = clean_text(object_name, "object name") or "object"
    defaults = default_lists()
    normal = _checked(defaults["normal_states"] if normal_states is None else normal_states, "normal states")
    anomalous = _checked(
        defaults["anomalous_states"] if anomalous_states is None else anomalous_states, "anomalous states"
    )
    words = [w for w in (clean_text(w, "defect word") for w in defect_words) if w]
    if len(words) > max_defect_words:
        raise ValueError(f"{len(words)} defect words given; at most {max_defect_words} are allowed")
    normal = tuple(dict.fromkeys(normal))
    anomalous = tuple(dict.fromkeys(anomalous + tuple(defect_state(w) for w in words)))
    temps = _checked(defaults["templates"] if templates is None else templates, "templates")

    def prompts(states: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_fill(t, _fill(s, name)) for s in states for t in temps)

    return PromptEnsemble(normal=prompts(normal), anomalous=prompts(anomalous))
