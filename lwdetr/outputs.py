"""transformers' forward options (`output_hidden_states`, `output_attentions`, `return_dict`) for our models.

Outputs are `transformers.utils.ModelOutput` dataclasses, so they index (`out[0]`, `out["logits"]`), unpack
(`to_tuple()`) and list their `keys()` as the reference's do, and `transformers.Trainer` reads the loss from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig
from transformers.utils import ModelOutput

__all__ = ["ModelOutput", "finish_output", "forward_options"]

# Passed by `transformers.Trainer` for models that normalise their loss by a token count; DETR losses normalise by
# the number of target boxes in the batch, so the count changes nothing.
_IGNORED = frozenset({"num_items_in_batch"})


def forward_options(
    owner: str,
    config: PretrainedConfig,
    output_hidden_states: bool | None,
    output_attentions: bool | None,
    return_dict: bool | None,
    extra: Mapping[str, Any],
) -> tuple[bool, bool]:
    """(hidden states wanted, return a ModelOutput rather than a tuple); `None` takes the config's setting.

    Raises:
        ValueError: an argument `owner.forward` does not know, or `output_attentions=True`, which no layer can honour:
            our attention kernels never form the weight matrices (the reference's default SDPA attention returns
            none either).
    """
    unknown = sorted(set(extra) - _IGNORED)
    if unknown:
        raise ValueError(
            f"{owner}.forward got unsupported argument(s) {', '.join(unknown)}; it accepts output_hidden_states "
            "and return_dict besides its inputs"
        )
    if output_attentions if output_attentions is not None else getattr(config, "output_attentions", False):
        raise ValueError(
            f"{owner}: output_attentions=True is not supported (the attention kernels never form attention "
            "weights); use output_hidden_states=True for intermediate features"
        )
    hidden = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    as_dict = return_dict if return_dict is not None else config.return_dict
    return bool(hidden), bool(as_dict)


def finish_output(output: ModelOutput, as_dict: bool) -> ModelOutput | tuple:
    """`output` itself, or with `return_dict=False` its non-None fields as a tuple (transformers' convention)."""
    return output if as_dict else output.to_tuple()
