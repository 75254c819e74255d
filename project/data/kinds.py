"""Kinds of data chosen by name, as models are: ``@register_data_kind("csv")`` on a DataModule
class, then a preset's ``data.kind: csv``.

A kind's class knows how to read its files, prepare a fold and turn raw inputs into features at
prediction time (``FoldDataModule``'s ``from_preset``, ``check_preset``, ``check_files`` and
``features_of``). The built-in kinds are ``csv`` (``project.data.tables``), ``idx`` and
``image-folder`` (``project.data.images``); one of your own registers itself in a module the
preset's ``imports`` names.
"""

from __future__ import annotations

from collections.abc import Callable

from project.data.base import FoldDataModule

DATA_KINDS: dict[str, type[FoldDataModule]] = {}


def register_data_kind(name: str) -> Callable[[type[FoldDataModule]], type[FoldDataModule]]:
    def register(cls: type[FoldDataModule]) -> type[FoldDataModule]:
        if name in DATA_KINDS and DATA_KINDS[name] is not cls:
            raise ValueError(f"data kind {name!r} is registered already, by {DATA_KINDS[name].__qualname__}")
        DATA_KINDS[name] = cls
        return cls

    return register


def data_kind(name: str) -> type[FoldDataModule]:
    if name not in DATA_KINDS:
        raise ValueError(
            f"data kind {name!r} is unknown: expected one of {', '.join(sorted(DATA_KINDS))} (a kind of your own: "
            "its module under the preset's imports registers it)"
        )
    return DATA_KINDS[name]
