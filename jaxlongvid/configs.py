"""JSON round trip shared by the frozen config dataclasses (models, scheduler)."""

from __future__ import annotations

import dataclasses


class JsonConfig:
    """Mixin for frozen dataclasses: ``to_dict`` (tuples as lists), ``from_dict`` (unknown fields rejected by
    name), ``replace``."""

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
