"""Petrel: language models on edge hardware, from Python.

>>> import petrel
>>> model = petrel.Model("smollm2-135m")            # a GGUF path or a known model name
>>> model.chat([{"role": "user", "content": "What is the capital of France?"}])
>>> for piece in model.generate("Once upon a time", max_tokens=32, stream=True):
...     print(piece, end="", flush=True)

Computation releases the GIL; errors raise ValueError (bad arguments, a prompt longer than
the context), FileNotFoundError/OSError (files) or petrel.PetrelError (the runtime).
"""

from ._native import Model, PetrelError, TextStream, __version__

__all__ = ["Model", "PetrelError", "TextStream", "__version__"]
