"""Presets: a tuned guidance setting as a file, read back as ordinary guidance terms.

A preset is the JSON file ``pagkit tune`` writes (``OUT/preset.json``)::

    {"pagkit_preset": 1, "method": "pag", "spec": "pag:1,layers=mid",
     "model": "fmnist", "family": "unet", "model_class": "UNet2DModel", ...,
     "evidence": [every setting tried, with its score and sample count], "confirmation": {...}}

``spec`` is the guidance in ``pagkit.spec``'s text form, so one loader serves every method:
``load_preset(path)`` is ``parse_spec(spec)``, the list of terms, which ``pagkit.sample(guidance=...)``,
``pagkit.attach(pipe, *load_preset(path))`` and ``GuidedDenoiser`` take as they take any terms
(``pagkit.PAG.from_preset(path)`` returns the one term, checking that it is a PAG preset).

Each loaded term remembers the model family it was tuned for (``term.tuned_for``, not a dataclass field:
terms still compare equal to the same terms built by hand); binding it to a model of another family
(``GuidedDenoiser``, hence ``sample`` and ``attach``) is an error naming both, since a site or block of one
family means nothing in another.

The shipped models ship their tuned presets as ``models/<model>/presets/<method>.json``; anywhere a preset file
is taken, ``"<model>:<method>"`` names one of them (``pagkit sample --preset fmnist:pag``,
``load_preset("fmnist:seg")``); ``shipped_presets()`` lists them.
"""
from __future__ import annotations

from pathlib import Path

from . import io

PRESET_VERSION = 1


def shipped_presets() -> dict[str, Path]:
    """The shipped models' tuned presets by name, ``"<model>:<method>"`` (e.g. ``"fmnist:pag"``)."""
    from .load import shipped_models
    return {f"{model}:{file.stem}": file for model, folder in shipped_models().items()
            for file in sorted((folder / "presets").glob("*.json"))}


def resolve_preset(path: str | Path) -> Path:
    """The file of a preset path or shipped preset name; one error naming the shipped ones if it is neither."""
    if Path(path).is_file():
        return Path(path)
    shipped = shipped_presets()
    if str(path) in shipped:
        return shipped[str(path)]
    names = ", ".join(shipped) or "none"
    raise FileNotFoundError(f"no preset file at {path} (pagkit tune writes OUT/preset.json), and no shipped "
                            f"preset of that name (shipped: {names})")


def load_preset(path: str | Path, *, method: str | type | None = None) -> list:
    """The guidance terms of the preset file ``path`` (``pagkit tune``'s ``preset.json``), or of a shipped
    preset by name (``"fmnist:pag"``: ``shipped_presets()``).

    ``method``: a method name (``"pag"``) or class (``pagkit.PAG``) the preset must be of; another method's
    preset is an error. Each term gets ``tuned_for`` = the preset's model family, checked when it is bound.
    """
    from .methods import METHODS
    from .spec import parse_spec
    path = resolve_preset(path)
    try:
        record = io.read_json(path)
    except ValueError as err:
        raise ValueError(f"{path} is not a preset: not JSON ({err})") from None
    if not isinstance(record, dict) or "pagkit_preset" not in record or "spec" not in record:
        raise ValueError(f"{path} is not a pagkit preset (no 'pagkit_preset' and 'spec' keys)")
    if record["pagkit_preset"] != PRESET_VERSION:
        raise ValueError(f"{path}: preset version {record['pagkit_preset']!r}; this pagkit reads version "
                         f"{PRESET_VERSION}")
    if method is not None:
        name = method if isinstance(method, str) else next((k for k, c in METHODS.items() if c is method), None)
        if name != record.get("method"):
            raise ValueError(f"{path} is a {record.get('method')} preset, not {name}; load it with "
                             f"pagkit.load_preset or as {record.get('method')}")
    terms = parse_spec(record["spec"])
    for term in terms:
        term.tuned_for = {"family": record.get("family"), "model": record.get("model"), "preset": str(path)}
    return terms


def check_family(terms, backend, model) -> None:
    """One clear error if a term from a preset was tuned for another model family than ``backend``'s."""
    for term in terms:
        tuned = getattr(term, "tuned_for", None)
        if tuned and tuned.get("family") and tuned["family"] != backend.name:
            raise ValueError(f"preset {tuned['preset']} was tuned for {tuned['model']} (the {tuned['family']} "
                             f"family); this model is {type(model).__name__} (the {backend.name} family): its "
                             "sites differ, so tune it with pagkit tune")
