"""nilmc: compile seq2point NILM models to edge targets, with accuracy proven per artifact.

The package's code lives in the top-level folders ``compiler/``, ``quantization/``,
``backends/``, ``calibration_data/`` and ``bitstreams/``; this folder links to them
(``nilmc/compiler -> ../compiler``, ...), so they install, type-check and import as
``nilmc.compiler``, ``nilmc.quantization``, ... Import them by those names: a bare
``import compiler`` raises ImportError (it would load a second copy of every class).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
