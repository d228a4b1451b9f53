"""The files a user writes: YAML loading with strict keys, `key=value` overrides, grid
expansion into cells, switching a cell's method, and the errors they get.

Everything a user writes passes through here and is validated whole (`memray.config`'s
schemas) before any model is loaded. Precedence (lowest first): typed defaults, the YAML
file, the grid cell, then command-line `key=value` overrides. Every error is a
`ConfigError` whose message names the file and the dotted field, e.g. ``sweeps/x.yaml:
method.placement: 'mlpp' is not one of attn, mlp, both``; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from memray.config import Cell, SweepConfig, TrialConfig
from memray.methods import METHODS as METHOD_REGISTRY
from memray.schema import ConfigError, Schema


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", f"not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", f"must be a mapping at the top level, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`method.rank=8` -> ("method.rank", 8); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w+.-]*", key):
        raise ConfigError("command line", text, "an override must look like key=value, e.g. method.rank=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError("command line", key, f"value is not valid YAML: {err}") from None
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict. A mapping value merges into what is there; a new
    `method.name` (or a `method` mapping with another name) starts that section afresh,
    since the other method's knobs do not apply."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    current = node.get(leaf)
    if key == "method.name" and isinstance(node, dict) and node.get("name") != value:
        node.clear()
        node["name"] = value
        return
    if isinstance(value, dict) and isinstance(current, dict):
        if key == "method" and "name" in value and value["name"] != current.get("name"):
            node[leaf] = copy.deepcopy(value)
        else:
            node[leaf] = _merge(current, value)
    else:
        node[leaf] = copy.deepcopy(value)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `tree` with dotted-key overrides applied in order."""
    result = copy.deepcopy(tree)
    for key, value in overrides.items():
        set_dotted(result, key, value)
    return result


# ---------------------------------------------------------------------------------------
# Validation with readable messages
# ---------------------------------------------------------------------------------------


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the schema section at `loc` (for 'unknown key' hints)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            # a discriminated-union branch: the loc names the method
            if part in METHOD_REGISTRY:
                current = METHOD_REGISTRY[part].config
                continue
            return None
        current = _section_type(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _section_type(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _describe(err: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    """(dotted field, message) for one pydantic error."""
    loc = list(err["loc"])
    # drop the discriminator branch pydantic inserts: ("method", "lora", "rank")
    clean = [p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "method" and p in METHOD_REGISTRY)]
    field = ".".join(str(p) for p in clean)
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx", {}) or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, tuple(loc[:-1])) or []
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        text = "unknown key"
        owners = [name for name in METHOD_REGISTRY if str(loc[-1]) in METHOD_REGISTRY[name].config.model_fields]
        if clean[:1] == ["method"] and len(clean) == 2 and owners:
            return field, (f"{loc[-1]} belongs to method {' / '.join(owners)} (set method.name={owners[0]}), "
                           f"not to {loc[1] if len(loc) > 2 else 'this method'}")
        if hint:
            text += f" (did you mean {hint[0]!r}?)"
        elif allowed:
            text += f" (allowed: {', '.join(allowed)})"
        return field, text
    if kind == "literal_error":
        expected = re.sub(r"'|\"", "", str(ctx.get("expected", ""))).replace(" or ", ", ")
        return field, f"{value!r} is not one of {expected}"
    if kind == "union_tag_invalid":
        return field + ".name" if field else "name", f"{ctx.get('tag')!r} is not one of {', '.join(METHOD_REGISTRY)}"
    if kind == "union_tag_not_found":
        return field + ".name", f"missing; one of {', '.join(METHOD_REGISTRY)}"
    if kind == "missing":
        return field, "required"
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        return field, message
    message = err["msg"]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        message = f"{value!r} is not valid: {message[0].lower()}{message[1:]}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = f"{value!r}: {message[0].lower()}{message[1:]}"
    return field, message


def validate(schema: type[Schema], raw: Any, source: str, prefix: str = "") -> Any:
    """Validate plain data against a schema; the first error becomes a ConfigError."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field, message = _describe(first, schema)
        field = f"{prefix}.{field}" if prefix and field else (prefix or field)
        more = len(err.errors()) - 1
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        raise ConfigError(source, field, message) from None


def validate_trial(raw: dict[str, Any], source: str) -> TrialConfig:
    """Plain data -> TrialConfig, or a ConfigError naming `source` and the field."""
    return validate(TrialConfig, raw, source)


# ---------------------------------------------------------------------------------------
# Sweeps and grid cells
# ---------------------------------------------------------------------------------------


def is_sweep(tree: dict[str, Any]) -> bool:
    """A sweep file has `base` or `grid` at the top; anything else is a plain trial file."""
    return "base" in tree or "grid" in tree


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SweepConfig, list[Cell]]:
    """Load a sweep file, apply overrides to its base, and validate every grid cell."""
    source = str(path)
    tree = load_yaml(path)
    if not is_sweep(tree):
        tree = {"name": Path(path).stem, "base": tree}
    sweep = validate(SweepConfig, tree, source)
    base = apply_overrides(sweep.base, overrides or {})
    return sweep, expand_grid(base, sweep.grid, source)


def expand_grid(base: dict[str, Any], grid: dict[str, list[Any]], source: str) -> list[Cell]:
    """Every combination of the axes applied to `base`, in file order, each validated."""
    keys = list(grid)
    cells: list[Cell] = []
    for index, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        axes = dict(zip(keys, values))
        raw = apply_overrides(base, axes)
        where = source if not keys else f"{source} (grid cell {index}: {_axes_text(axes)})"
        cells.append(Cell(index=index, axes=axes, config=validate_trial(raw, where)))
    return cells


def _axes_text(axes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in axes.items())


def switch_method(tree: dict[str, Any], overrides: dict[str, Any], grid: dict[str, list[Any]] | None = None,
                  notes: list[str] | None = None) -> dict[str, Any]:
    """Overrides that switch the method (`method.name=lora` on a `full` base) start from the
    new method's own settings: the grid's first `method` entry of that name when the sweep
    has one (its lr, rank, ...), else the base's keys the new method accepts but its lr
    (tuned for the old method: the new one's default instead). Returns the overrides to apply,
    with the switch spelled out as a whole `method` section; one line per switch goes to
    `notes`."""
    name = overrides.get("method.name")
    old = tree.get("method") if isinstance(tree.get("method"), dict) else {}
    if name is None or name == old.get("name") or name not in METHOD_REGISTRY:
        return overrides
    entries = [v for v in (grid or {}).get("method", []) if isinstance(v, dict) and v.get("name") == name]
    accepted = set(METHOD_REGISTRY[name].config.model_fields)
    if entries:
        section = dict(entries[0])
        how = f"the sweep grid's {name} entry"
    else:
        # lr is every method's key, but one tuned for the old method: the new one's default instead
        section = {key: value for key, value in old.items() if key in accepted and key != "lr"}
        how = f"{old.get('name')}'s settings that {name} accepts"
    section["name"] = name
    dropped = sorted(set(old) - set(section) - {"name"})
    rest = {key: value for key, value in overrides.items() if not key.startswith("method.")}
    own = {key: value for key, value in overrides.items() if key.startswith("method.") and key != "method.name"}
    if notes is not None:
        shown = {**section, **{key.split(".", 1)[1]: value for key, value in own.items()}}
        settings = ", ".join(f"{k} {v}" for k, v in shown.items() if k != "name") or "its defaults"
        lost = f"; dropped {', '.join(f'{k} {old[k]}' for k in dropped)} (of {old.get('name')})" if dropped else ""
        lr = "" if "lr" in section else f" (lr: {name}'s default)"
        notes.append(f"method.name={name}: {settings} (from {how} and your overrides){lr}{lost}")
    return {"method": section, **own, **rest}


def load_trial(path: str | Path, overrides: list[str] | None = None, cell: int | None = None,
               notes: list[str] | None = None) -> TrialConfig:
    """The trial `memray trial FILE [key=value ...] [--cell N]` runs.

    A plain trial file, or a sweep file's `base` (with `--cell N`: its N-th grid cell).
    Command-line overrides apply last; one switching the method is `switch_method`'s (its
    line goes to `notes`).
    """
    parsed = dict(parse_override(o) for o in overrides or [])
    source = str(path)
    tree = load_yaml(path)
    if is_sweep(tree):
        sweep = validate(SweepConfig, tree, source)
        if cell is None:
            raw = apply_overrides(sweep.base, switch_method(sweep.base, parsed, sweep.grid, notes))
            return validate_trial(raw, source)
        cells = expand_grid(sweep.base, sweep.grid, source)
        if not 0 <= cell < len(cells):
            raise ConfigError(source, "--cell", f"{cell} is out of range: the grid has {len(cells)} cells (0..{len(cells) - 1})")
        base = apply_overrides(sweep.base, cells[cell].axes)
        return validate_trial(apply_overrides(base, switch_method(base, parsed, sweep.grid, notes)), source)
    if cell is not None:
        raise ConfigError(source, "--cell", "this is a plain trial file, not a sweep (no base/grid)")
    return validate_trial(apply_overrides(tree, switch_method(tree, parsed, None, notes)), source)
