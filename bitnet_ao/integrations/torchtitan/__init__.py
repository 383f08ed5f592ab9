"""BitNet training in torchtitan 0.3.0 (the ``bitnet_ao[torchtitan]`` extra).

- :class:`BitNetConverter`: a model-config converter, like torchtitan's float8 one, that turns the selected
  ``Linear`` configs into :class:`BitNetLinear` configs (all but ``lm_head`` by default).
- :func:`register_bitnet_scale_hook`: a ``ModelSpec.post_optimizer_build_fn`` that recomputes the BitNet
  weight scales after every optimizer step with one all-reduce.
- ``config_registry``: ``--module bitnet_ao.integrations.torchtitan --config llama3_8b_bitnet``.

See docs/torchtitan.md.
"""

try:
    import torchtitan  # noqa: F401
except ImportError as e:
    raise ImportError(
        "bitnet_ao.integrations.torchtitan needs torchtitan 0.3.0: pip install 'bitnet_ao[torchtitan]'"
    ) from e

from .converter import BitNetConverter, BitNetLinear
from .hooks import register_bitnet_scale_hook

__all__ = ["BitNetConverter", "BitNetLinear", "register_bitnet_scale_hook"]
