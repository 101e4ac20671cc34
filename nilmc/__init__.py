"""nilmc: compile seq2point NILM models to edge targets, with accuracy proven per artifact.

The package's code lives in the top-level folders ``compiler/``, ``quantization/``,
``backends/``, ``calibration_data/`` and ``bitstreams/``, installed as
``nilmc.compiler``, ``nilmc.quantization``, ... (see ``pyproject.toml``).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
