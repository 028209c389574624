"""erase: remove a concept from a diffusion model by saliency unlearning, and prove it.

import erase
result = erase.erase_concept("sd-v1-4", "nudity", output="outputs/no-nudity")
"""

from erase.errors import EraseError

__version__ = "0.1.0"
__all__ = [
    "EraseError",
    "__version__",
    "attack",
    "benchmark",
    "erase_concept",
    "evaluate",
    "export_model",
    "load_model",
]

# The API pulls in torch and diffusers: loaded on first use, so `import erase` stays light.
_API = (
    "attack",
    "benchmark",
    "erase_concept",
    "evaluate",
    "export_model",
    "load_model",
    "ErasedModel",
)


def __getattr__(name: str):
    """erase.erase_concept, erase.evaluate, erase.attack, ...: imported from erase.api on use."""
    if name in _API:
        from erase import api

        return getattr(api, name)
    raise AttributeError(f"module 'erase' has no attribute '{name}'")
