"""Keys a composed config may hold: Hydra lets ``+trainer.epoch=5`` append to a structured group; we refuse it.

Structured groups (``trainer``, ``log``, ``export``, ...) may hold only their
dataclass fields; ``data`` and ``optimizer`` only the keys of their config
files (``data=text``: :data:`DATA_KEYS`). ``model`` keys are the model builder's keyword arguments (checked there)
and ``freeze.rules`` is free-form (checked by the rule parser).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

from omegaconf import DictConfig

from trainer.suggest import suggestion

__all__ = ["DATA_KEYS", "FREE_FORM", "GROUP_KEYS", "ROOT_GROUPS", "unknown_key"]

GROUP_KEYS: Dict[str, Tuple[str, ...]] = {
    "data": ("name", "path", "validation_size", "tokens", "classes", "standardize"),
    "optimizer": ("name", "learning_rate", "schedule", "options"),
}
DATA_KEYS: Dict[str, Tuple[str, ...]] = {  # data sets whose keys are not GROUP_KEYS["data"] (configs/data/<name>.yaml)
    "text": ("name", "path", "include", "exclude", "sequence_length", "max_bytes", "validation_fraction",
             "test_fraction", "tokenizer"),
}
FREE_FORM = ("model", "freeze.rules", "optimizer.options", "hydra")
ROOT_GROUPS = ("experiment", "hparams_search")  # group names: `+experiment=...` is what a root typo usually meant


def _allowed(schema, section: str, node: DictConfig) -> List[str]:
    if section == "data" and node.get("name") in DATA_KEYS:
        return list(DATA_KEYS[node.get("name")])
    if section in GROUP_KEYS:
        return list(GROUP_KEYS[section])
    return [f.name for f in dataclasses.fields(schema)]


def unknown_key(cfg: DictConfig, schema) -> Tuple[str, str]:
    """The first key of ``cfg`` that ``schema`` (a dataclass such as :class:`trainer.config.Config`) lacks.

    Returns:
      ``(message, hint)`` for a :class:`trainer.config.ConfigError`, or ``("", "")`` when every key is known.
      The hint names the nearest valid key and lists the valid ones.
    """
    return _walk(cfg, schema, "")


def _walk(node: DictConfig, schema, section: str) -> Tuple[str, str]:
    allowed = _allowed(schema, section, node)
    for key in node.keys():
        full = f"{section}.{key}" if section else str(key)
        if full in FREE_FORM:
            continue
        if key not in allowed:
            return _error(full, str(key), allowed, section)
        child = node.get(key) if not isinstance(node.get(key, None), str) else None
        field_type = _field_type(schema, str(key)) if section not in GROUP_KEYS else None
        if isinstance(child, DictConfig) and (dataclasses.is_dataclass(field_type) or full in GROUP_KEYS):
            found = _walk(child, field_type, full)
            if found[0]:
                return found
    return "", ""


def _field_type(schema, name: str):
    for field in dataclasses.fields(schema):
        if field.name == name:
            factory = field.default_factory  # the section's dataclass (the annotations are strings)
            return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None
    return None


def _error(full: str, key: str, allowed: Sequence[str], section: str) -> Tuple[str, str]:
    if section:
        return (f"{full} is not a config key",
                suggestion(key, allowed, f"valid keys of {section}", prefix=f"{section}."))
    return (f"{full} is not a config key",
            suggestion(key, list(allowed) + list(ROOT_GROUPS), "valid top-level keys and groups"))
