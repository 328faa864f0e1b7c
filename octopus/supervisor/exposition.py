"""The Prometheus text exposition format, version 0.0.4, written by hand.

One family is a ``# HELP`` line, a ``# TYPE`` line and its samples::

    # HELP octopus_connections_accepted_total Connections accepted.
    # TYPE octopus_connections_accepted_total counter
    octopus_connections_accepted_total{worker="0"} 1234

Escaping: in HELP text, backslash and newline; in label values, backslash,
double quote and newline. Values are integers or floats (``+Inf``, ``-Inf``
and ``NaN`` spelled as Prometheus reads them). A counter's name ends in
``_total``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = Mapping[str, str]


@dataclass
class Family:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.kind not in ("counter", "gauge"):
            raise ValueError(f"bad metric {self.name!r} ({self.kind})")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    for name in labels:
        if not _LABEL.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"bad label name {name!r}")
    return "{" + ",".join(f'{name}="{_escape_value(str(value))}"'
                          for name, value in labels.items()) + "}"


def render(families: Iterable[Family]) -> str:
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        lines.extend(f"{family.name}{_labels(labels)} {format_value(value)}"
                     for labels, value in family.samples)
    return "\n".join(lines) + "\n"
