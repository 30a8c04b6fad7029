"""Small shared types, importable without torch (the HTTP schemas use them too)."""

from __future__ import annotations

from typing import Literal

TruncationSide = Literal["right", "left"]
Activation = Literal["none", "sigmoid"]
Precision = Literal["fp32", "fp16", "bf16"]
