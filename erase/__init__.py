"""erase: remove a concept from a diffusion model by saliency unlearning, and prove it.

import erase
result = erase.erase_concept("sd-v1-4", "nudity", output="outputs/no-nudity")
"""

import contextlib
import logging

from erase.errors import EraseError

# bitsandbytes (--optimizer adam8bit), which diffusers and transformers import when it is
# installed, warns at import about optional CPU kernels erase does not use, and on a CPU with
# AVX-512 BF16 asks the `kernels` package for one from the Hub, which warns offline: a CLI's
# failure must stay its one stderr line.
IMPORT_NOISE = ("bitsandbytes", "kernels")
for _name in IMPORT_NOISE:
    logging.getLogger(_name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_import_noise():
    """IMPORT_NOISE's loggers at ERROR inside, put back as they were after (a caller may have
    changed them since import)."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


__version__ = "0.1.0"

# The API pulls in torch and diffusers: loaded on first use, so `import erase` stays light.
_LAZY = {
    "attack": "erase.api",
    "benchmark": "erase.bench",
    "erase_concept": "erase.api",
    "evaluate": "erase.api",
    "export_model": "erase.api",
    "load_model": "erase.api",
    "ErasedModel": "erase.api",
    "ErasureConfig": "erase.config",
}
__all__ = ["EraseError", "__version__", *_LAZY]


def __getattr__(name: str):
    """erase.erase_concept, erase.ErasureConfig, ...: imported from their module on use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erase' has no attribute '{name}'")
