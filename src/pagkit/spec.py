"""Guidance written as text: ``"cfg:3; pag:1,layers=mid+down.2"`` ⇄ ``[CFG(3), PAG(1, layers=["mid", "down.2"])]``.

One spec is the guidance of one sample row: terms separated by ``;``, each ``method[:value,key=value,...]``.
``method`` is a name of ``pagkit.methods.METHODS``; a bare first value is the term's ``scale``; every other
key is a field of the method's dataclass, so a new method gets its command-line form for free. A combination
rule is ``rule=apg`` or ``rule=apg(eta=0,momentum=-0.5)`` (``pagkit.methods.RULES``, its fields likewise). Values are
read by the field's default: numbers (``inf`` allowed), ``true``/``false``, ``none`` where the default is
None, and lists joined by ``+`` (``layers=mid+down.2``, ``layers=7+8+9``; a one-item list ``layers=mid+``).
Fields that hold objects (a weak model, tensors) cannot be written as text and say so.

``format_spec`` writes a term back (the fields that differ from the defaults), so
``parse_spec(format_spec(terms)) == terms``; ``label`` is the short caption of a grid row.
"""
from __future__ import annotations

import dataclasses
import math
import os

from .methods import METHODS, GuidanceTerm

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _is_list(field: dataclasses.Field) -> bool:
    return isinstance(_default(field), (list, tuple)) or any(w in str(field.type) for w in ("list", "tuple"))


def _scalar(text: str, default, where: str):
    low = text.strip().lower()
    if low == "none" and (default is None or "None" in where):
        return None
    if isinstance(default, bool):
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError(f"{where} is true or false, got {text!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(low)
        except ValueError:
            raise ValueError(f"{where} is an integer, got {text!r}") from None
    if isinstance(default, float) or (default is None and "float" in where):
        try:
            return float(low)
        except ValueError:
            raise ValueError(f"{where} is a number, got {text!r}") from None
    return text.strip()


def _value(cls, name: str, field: dataclasses.Field, text: str):
    where = f"{cls.__name__} {name} ({field.type})"
    if _is_list(field) and ("+" in text or not isinstance(_default(field), str)):
        items = [t.strip() for t in text.split("+") if t.strip()]
        if not items:
            raise ValueError(f"{where} needs at least one item, got {text!r}")
        return [int(t) if t.isdigit() else t for t in items]
    if _is_list(field):  # a str-or-list field (layers): one item stays a string
        return text.strip()
    return _scalar(text, _default(field), where)


def _method(name: str) -> type[GuidanceTerm]:
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown guidance method {name.strip()!r}; choose one of {', '.join(METHODS)}")
    return cls


def _split(text: str) -> list[str]:
    """Split on the commas outside parentheses (``rule=apg(eta=0,momentum=-0.5)`` stays one item)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise ValueError(f"unbalanced ')' in {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
    return [item for item in items + [text[start:]] if item.strip()]


def _rule(text: str):
    """A combination rule: ``apg`` or ``apg(eta=0,norm_threshold=4)`` (``pagkit.methods.RULES``)."""
    from .methods import RULES
    name, _, rest = text.strip().partition("(")
    cls = RULES.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown combination rule {name.strip()!r}; choose one of {', '.join(RULES)}")
    if rest and not rest.rstrip().endswith(")"):
        raise ValueError(f"a rule's options go in parentheses: {name.strip()}(key=value,...), got {text!r}")
    return cls(**_options(cls, _split(rest.rstrip()[:-1]) if rest else [], bare=None))


def _options(cls, items: list[str], bare: str | None) -> dict:
    """``key=value`` items read by the fields of dataclass ``cls``; a first item without a key is ``bare``."""
    fields = _fields(cls)
    options = {}
    for i, item in enumerate(items):
        key, eq, raw = item.partition("=")
        if not eq:
            if i or bare is None:
                raise ValueError(f"{cls.__name__}: {item.strip()!r} needs a key (key=value)"
                                 + ("; only the first value may be bare (the scale)" if bare else ""))
            key, raw = bare, item
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"{cls.__name__} has no option {key!r}; its options: {', '.join(fields)}")
        if key in options:
            raise ValueError(f"{cls.__name__}: {key} given twice")
        if key == "rule":
            options[key] = None if raw.strip().lower() == "none" else _rule(raw)
            continue
        default = _default(fields[key])
        if default is not None and not isinstance(default, (bool, int, float, str, list, tuple)):
            raise ValueError(f"{cls.__name__} {key} is an object and cannot be given as text; "
                             f"construct pagkit.{cls.__name__} in Python")
        options[key] = _value(cls, key, fields[key], raw)
    return options


def parse_term(text: str) -> GuidanceTerm:
    """One term: ``"pag"``, ``"pag:1"``, ``"pag:1,layers=mid+down.2,start=0.2,rule=apg(eta=0)"``."""
    name, _, rest = text.strip().partition(":")
    if not name.strip():
        raise ValueError(f"a guidance term starts with its method's name ({', '.join(METHODS)}), got {text!r}")
    cls = _method(name)
    return cls(**_options(cls, _split(rest), bare="scale"))


def parse_spec(text: str) -> list[GuidanceTerm]:
    """One row's guidance: terms separated by ``;``. ``"none"`` (or an empty string) is no guidance."""
    if text.strip().lower() in ("", "none"):
        return []
    from .methods import check_guidance
    return check_guidance([parse_term(part) for part in text.split(";") if part.strip()])


def _text(value) -> str:
    from .methods import RULES, Rule
    if isinstance(value, Rule):
        name = next(k for k, cls in RULES.items() if type(value) is cls)
        changed = _changed(value, always=())
        return name + (f"({','.join(f'{k}={_text(v)}' for k, v in changed.items())})" if changed else "")
    if isinstance(value, (list, tuple)):
        return "+".join(_text(v) for v in value)
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)  # str, int, a path


def _changed(term: GuidanceTerm, always=("scale",)) -> dict:
    """The fields that differ from the method's defaults (and those in ``always``), in declaration order."""
    out = {}
    for name, field in _fields(type(term)).items():
        value, default = getattr(term, name), _default(field)
        same = (list(value) == list(default)) if isinstance(value, (list, tuple)) and \
            isinstance(default, (list, tuple)) else value == default
        if name in always or not same:
            out[name] = value
    return out


def format_term(term: GuidanceTerm) -> str:
    name = next(k for k, cls in METHODS.items() if type(term) is cls)
    changed = _changed(term)
    for key, value in changed.items():
        if key != "rule" and not isinstance(value, (bool, int, float, str, list, tuple, type(None), os.PathLike)):
            raise ValueError(f"{type(term).__name__} {key} is a {type(value).__name__}, which has no text form; "
                             f"give it by name or path (e.g. weak_model=fmnist-weak)")
    fields = _fields(type(term))
    # a one-item list in a field whose default is a string (layers=["mid"]) is written "mid+": "mid" reads as a str
    parts = [_text(changed.pop("scale"))] + [
        f"{k}={_text(v)}" + ("+" if isinstance(v, list) and len(v) == 1 and isinstance(_default(fields[k]), str)
                             else "") for k, v in changed.items()]
    return f"{name}:{','.join(parts)}"


def format_spec(terms) -> str:
    return "; ".join(format_term(t) for t in terms) if terms else "none"


def label(terms) -> str:
    """A grid caption: ``"PAG 1 (layers=mid)"``, ``"CFG 3 + PAG 1"``; ``"no guidance"`` for none."""
    if not terms:
        return "no guidance"
    out = []
    for term in terms:
        changed = _changed(term, always=("scale", "layers", "layer"))  # where it acts is always shown
        scale = _text(changed.pop("scale"))
        extra = ", ".join(f"{k}={_text(v)}" for k, v in changed.items())
        out.append(f"{type(term).__name__} {scale}" + (f" ({extra})" if extra else ""))
    return " + ".join(out)
