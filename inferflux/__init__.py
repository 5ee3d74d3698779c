"""InferFlux: an LLM inference runtime and server on JAX/XLA.

`from inferflux import LLM, SamplingParams` is the research API. Both names
load lazily, so importing a submodule (the CLI, the formats) does not start JAX.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "Constraint", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from inferflux.llm import LLM

        return LLM
    if name == "SamplingParams":
        from inferflux.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "Constraint":
        from inferflux.engine.grammar import Constraint

        return Constraint
    raise AttributeError(f"module 'inferflux' has no attribute {name!r}")
