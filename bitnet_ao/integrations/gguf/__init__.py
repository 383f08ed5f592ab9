"""A BitNet model as one GGUF file that stock llama.cpp runs (docs/gguf.md): :func:`save_gguf`.

Every block linear is written as ``TQ2_0`` or ``TQ1_0`` blocks built from the model's exact ternary values and
its fp16-rounded scale, for a trained (master-weight) model and for a packed (``bitnet_inference``) one alike. The
package, one job per module:

- ``plan.py``: which llama.cpp graph (``llama`` without norm surgery, ``bitnet`` for the subln placement) and
  which hyperparameters and modules are written, every check passed before a file is opened
  (:func:`gguf_architecture` runs them alone);
- ``quants.py``: the block formats as bytes (``TQ2_0`` / ``TQ1_0`` from int8 values, ``F16`` / ``Q8_0`` /
  ``Q6_K`` for the embedding and the head);
- ``vocab.py``: the vocabulary (the 256 bytes, or a Hugging Face byte-level BPE tokenizer);
- ``writer.py``: :func:`save_gguf`, the tensors in llama.cpp's names and the file.
"""

from __future__ import annotations

from .plan import Architecture, gguf_architecture
from .quants import BLOCK, EmbeddingType, TernaryType, ternary_blocks
from .writer import save_gguf

__all__ = ["BLOCK", "Architecture", "EmbeddingType", "TernaryType", "gguf_architecture", "save_gguf", "ternary_blocks"]
