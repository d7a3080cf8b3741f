"""The CPU speed code, in one place: the model files call `dispatch` once per module that has a fast path and
otherwise read like the reference.

- `dispatch`: the seam, `fast_<module>(module, inputs)` -> the module's result the fast way, or None;
- `fused`: oneDNN inference forwards (fused GEMMs and convolutions, folded and packed weights), on `packing`;
- `attention`, `sampling`: our compiled attention and deformable-sampling kernels (C sources in `kernels/`), built
  and loaded by `build`;
- `buffer_reusing_mlp`: the training MLP whose backward allocates no [rows, hidden] tensor;
- `features`: what this machine's CPU can do, asked once; `guards`: whether a call may take a fast path.

`LWDETR_CPU_KERNELS=0` switches our compiled kernels off; `LWDETR_CACHE` moves their build cache.
"""

from .build import kernel_status, kernel_summary, prepare_kernels, start_background_build
from .dispatch import (
    fast_conv_bn_act,
    fast_decoder_ffn,
    fast_decoder_values,
    fast_deformable_sampling,
    fast_group_attention,
    fast_patch_embedding,
    fast_vit_attention,
    fast_vit_block,
    fast_vit_mlp,
)
from .features import isa_summary, reduced_precision_fallback

__all__ = [
    "fast_conv_bn_act",
    "fast_decoder_ffn",
    "fast_decoder_values",
    "fast_deformable_sampling",
    "fast_group_attention",
    "fast_patch_embedding",
    "fast_vit_attention",
    "fast_vit_block",
    "fast_vit_mlp",
    "isa_summary",
    "kernel_status",
    "kernel_summary",
    "prepare_kernels",
    "reduced_precision_fallback",
    "start_background_build",
]
