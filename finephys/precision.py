"""The one spelling of a precision: ``Precision.FP16`` is written ``float16`` on disk (manifests,
reports), accepted as ``fp16`` / ``float16`` / ``torch.float16`` from users and code."""
from __future__ import annotations

from enum import Enum

import torch

from finephys.errors import InputError


class Precision(str, Enum):
    FP16 = "float16"
    FP32 = "float32"

    @classmethod
    def of(cls, value) -> "Precision":
        """``value`` as a Precision: a Precision, a torch dtype, or one of its names."""
        if isinstance(value, cls):
            return value
        if isinstance(value, torch.dtype):
            for p in cls:
                if p.dtype == value:
                    return p
            raise InputError(f"precision {value}: expected torch.float16 or torch.float32")
        for p in cls:
            if value in (p.value, p.short):
                return p
        raise InputError(f"precision {value!r}: expected fp16 or fp32")

    @property
    def short(self) -> str:
        """The command-line spelling: fp16, fp32."""
        return "fp" + self.value[len("float"):]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.value)

    def __str__(self) -> str:
        return self.value
