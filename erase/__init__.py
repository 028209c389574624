"""erase: remove a concept from a diffusion model by saliency unlearning, and prove it."""

from erase.errors import EraseError

__version__ = "0.1.0"
__all__ = ["EraseError", "__version__"]
