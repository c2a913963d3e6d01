"""What the Hugging Face converter raises and notes."""

from __future__ import annotations

import warnings


class ConversionError(ValueError):
    """A Hugging Face checkpoint or model config this converter cannot map exactly.

    The message names the config key or the tensor.
    """


class ConversionNote(UserWarning):
    """Something the converter left out or changed on purpose.

    MTP layers skipped, FP8 weights dequantised: shown as a warning and listed in the report.
    """


def note(message: str) -> str:
    """Warn with ``message`` as a :class:`ConversionNote` and return it (for the report)."""
    warnings.warn(message, ConversionNote, stacklevel=3)
    return message
