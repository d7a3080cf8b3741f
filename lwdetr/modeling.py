"""LW-DETR: ViT encoder -> C2f projector -> mixed query selection -> deformable decoder -> heads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import host_sync
from .checkpoint import PretrainedMixin
from .config import LwDetrConfig
from .decoder import Decoder
from .deformable import MultiScaleDeformableAttention
from .layers import MLP, refine_boxes
from .outputs import ModelOutput, finish_output, forward_options
from .projector import MultiScaleProjector
from .query_selection import EncoderHeads, token_proposals
from .vit import LwDetrViTBackbone, ViTBlock, ViTEmbeddings

__all__ = ["LwDetrModel", "LwDetrForObjectDetection", "LwDetrModelOutput", "LwDetrObjectDetectionOutput"]


@dataclass
class LwDetrModelOutput(ModelOutput):
    """Shapes: Q = num_queries (x group_detr in training), L = decoder layers. Fields in the reference's order.

    init_reference_points [B, Q, 4]; last_hidden_state [B, Q, D]; intermediate_hidden_states [L, B, Q, D];
    intermediate_reference_points [1, B, Q, 4] (LW-DETR keeps one set of reference boxes for all layers); with
    `output_hidden_states`, hidden_states: L + 1 tensors [B, Q, D], the decoder's input queries, each layer's output
    and, last, `last_hidden_state` (the final layer norm applied) as the reference returns them.

    The two encoder fields keep the reference's names, which do not say what they hold (the reference's model
    returns the same; code written for transformers reads these names and positions):
    enc_outputs_class [B, Q, D] is not class scores but the selected encoder tokens (projected, normalised), from
    which `LwDetrForObjectDetection` computes the class logits it returns under the same name;
    enc_outputs_coord_logits [B, Q, 4] is not logits but the proposals' boxes, cxcywh in normalised image units
    (LW-DETR refines boxes directly, with no sigmoid). `enc_outputs_logits` is ours: those class logits [B, Q, C].
    """

    init_reference_points: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    intermediate_reference_points: torch.Tensor | None = None
    enc_outputs_class: torch.Tensor | None = None
    enc_outputs_coord_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    enc_outputs_logits: torch.Tensor | None = None  # ours: the class logits of the selected tokens [B, Q, C]


@dataclass
class LwDetrObjectDetectionOutput(ModelOutput):
    """As `LwDetrModelOutput`, plus logits [B, Q, C], pred_boxes [B, Q, 4] (cxcywh in [0, 1]) and, with labels,
    the loss, its named parts and the per-layer auxiliary predictions.

    Unlike the base model's field of the same name, enc_outputs_class here holds class logits [B, Q, C] of the
    two-stage proposals, as in the reference; enc_outputs_coord_logits holds their boxes [B, Q, 4], cxcywh in
    normalised image units, not logits (the reference's names, kept for compatibility)."""

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None
    init_reference_points: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    intermediate_reference_points: torch.Tensor | None = None
    enc_outputs_class: torch.Tensor | None = None
    enc_outputs_coord_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BackboneWithProjector(nn.Module):
    """ViT + projector: pixels -> list of [B, d_model, h, w] maps with their [B, h, w] validity masks."""

    def __init__(self, config: LwDetrConfig):
        super().__init__()
        self.backbone = LwDetrViTBackbone(config.backbone_config)
        self.projector = MultiScaleProjector(config)

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pixel_mask None: nothing is padded (every map's mask is all True)."""
        # the encoder may run in a lower precision than the rest (see `LwDetrForObjectDetection.to_mixed_precision`)
        pixel_values = pixel_values.to(self.backbone.embeddings.projection.weight.dtype)
        maps = self.projector(self.backbone(pixel_values, return_dict=True).feature_maps)
        if pixel_mask is None:
            return [(m, m.new_ones((m.shape[0], *m.shape[-2:]), dtype=torch.bool)) for m in maps]
        mask = pixel_mask[:, None].float()
        return [(m, F.interpolate(mask, size=m.shape[-2:], mode="nearest")[:, 0].bool()) for m in maps]


def _valid_ratio(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fraction of valid columns and rows of a [B, h, w] mask: [B, 2] as (w, h)."""
    height, width = mask.shape[1:]
    rows = mask[:, :, 0].sum(1).to(dtype) / height
    cols = mask[:, 0, :].sum(1).to(dtype) / width
    return torch.stack((cols, rows), -1)


class LwDetrModel(PretrainedMixin, nn.Module):
    """Backbone, projector, query selection and decoder; no final heads."""

    main_input_name = "pixel_values"

    def __init__(self, config: LwDetrConfig):
        super().__init__()
        self.config = config
        self.backbone = BackboneWithProjector(config)
        total_queries = config.num_queries * config.group_detr
        self.reference_point_embed = nn.Embedding(total_queries, 4)
        self.query_feat = nn.Embedding(total_queries, config.d_model)
        self.decoder = Decoder(config)
        self.encoder_heads = EncoderHeads(config.d_model, config.num_labels, config.group_detr)

    @property
    def groups(self) -> int:
        """Group DETR groups in use: all in training, only the first at inference."""
        return self.config.group_detr if self.training else 1

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> LwDetrModelOutput | tuple:
        """pixel_values: [B, 3, H, W] normalised; pixel_mask: [B, H, W] 1 on real pixels. The options are
        transformers' (see `outputs.forward_options`); `return_dict=False` gives the output's non-None fields."""
        hidden_wanted, as_dict = forward_options(
            type(self).__name__, self.config, output_hidden_states, output_attentions, return_dict, kwargs
        )
        self.backbone.backbone.check_input(pixel_values)
        batch, _, height, width = pixel_values.shape
        # with nothing padded all masking is a no-op: an all-ones mask is treated as none, so no full-resolution mask
        # is resampled per level and the decoder masks no values. The data-dependent test stays out of traced and
        # compiled graphs, which keep the masking, and off a GPU mask, where it would wait for the device (callers
        # that know nothing is padded pass None)
        padded = pixel_mask is not None and (
            torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or not host_sync.reads_are_free(pixel_mask)
            or not bool(pixel_mask.all())
        )
        if pixel_mask is not None and pixel_mask.shape != (batch, height, width):
            raise ValueError(f"pixel_mask has shape {tuple(pixel_mask.shape)}; expected {(batch, height, width)}")
        if not padded:
            pixel_mask = None
        dtype = self.query_feat.weight.dtype
        levels = [(m.to(dtype), mask) for m, mask in self.backbone(pixel_values, pixel_mask)]
        spatial_shapes = [tuple(m.shape[-2:]) for m, _ in levels]
        memory = torch.cat([m.permute(0, 2, 3, 1).flatten(1, 2) for m, _ in levels], 1)  # [B, sum(h*w), D]
        memory_mask = torch.cat([mask.flatten(1) for _, mask in levels], 1)
        valid_ratios = torch.stack([_valid_ratio(mask, memory.dtype) for _, mask in levels], 1)

        k, groups = self.config.num_queries, self.groups
        if memory.shape[1] < k:
            raise ValueError(
                f"image size {height}x{width} gives {memory.shape[1]} feature tokens, fewer than the "
                f"{k} queries the model selects from them; use a larger input"
            )
        tokens, anchors, invalid = token_proposals(memory, ~memory_mask, spatial_shapes)
        selected = [self.encoder_heads.select(g, tokens, anchors, invalid, k) for g in range(groups)]
        enc_boxes = torch.cat([s[0] for s in selected], 1)
        enc_queries = torch.cat([s[2] for s in selected], 1)

        used = k * groups
        reference_boxes = refine_boxes(enc_boxes.detach(), self.reference_point_embed.weight[:used][None])
        queries = self.query_feat.weight[:used][None].expand(batch, -1, -1)
        value_mask = memory_mask if padded else None
        decoder_inputs = (queries, reference_boxes, valid_ratios, memory, value_mask, spatial_shapes, groups)
        hidden, hidden_states = self._decode(decoder_inputs, hidden_wanted)
        output = LwDetrModelOutput(
            init_reference_points=reference_boxes,
            last_hidden_state=hidden[-1],
            intermediate_hidden_states=hidden,
            intermediate_reference_points=reference_boxes[None],
            enc_outputs_class=enc_queries,
            enc_outputs_coord_logits=enc_boxes,
            hidden_states=hidden_states,
            enc_outputs_logits=torch.cat([s[1] for s in selected], 1),
        )
        return finish_output(output, as_dict)

    def _decode(self, inputs: tuple, hidden_wanted: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The decoder's [L, B, Q, D] output and, if wanted, the hidden states in the reference's layout: the input
        queries, each layer's output before the shared final norm, and the last one after it."""
        if not hidden_wanted:
            return self.decoder(*inputs), None
        layer_outputs: list[torch.Tensor] = []
        # hooks rather than a second code path in the decoder: the layers' outputs are only read
        hooks = [
            layer.register_forward_hook(lambda _, __, out: layer_outputs.append(out)) for layer in self.decoder.layers
        ]
        try:
            hidden = self.decoder(*inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return hidden, (inputs[0], *layer_outputs[:-1], hidden[-1])


class LwDetrForObjectDetection(PretrainedMixin, nn.Module):
    """LW-DETR with class and box heads, the Group DETR training loss, and HF-format load/save."""

    # tells `transformers.Trainer` that the loss is already normalised (by the number of target boxes), so it does
    # not pass `num_items_in_batch` and scales the loss for gradient accumulation itself
    accepts_loss_kwargs = False
    main_input_name = "pixel_values"

    def __init__(self, config: LwDetrConfig):
        super().__init__()
        self.config = config
        self.model = LwDetrModel(config)
        self.class_embed = nn.Linear(config.d_model, config.num_labels)
        self.bbox_embed = MLP(config.d_model, config.d_model, 4, num_layers=3)
        self.init_weights()

    def to_mixed_precision(self, dtype: torch.dtype | str = torch.bfloat16) -> LwDetrForObjectDetection:
        """Put the ViT encoder and projector (nearly all the FLOPs) in `dtype` and everything after them in fp32.

        Query selection (top-k over scores), the deformable decoder's sampling and the box refinement (`exp`) stay
        in fp32, where a bf16 model's rounding would reorder near-tied proposals or overflow LayerNorm statistics.
        Returns self.
        """
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.float()
        self.model.backbone.to(dtype)
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """LW-DETR's init: truncated normal in the ViT, normal(init_std) elsewhere, deformable-attention rings,
        class biases at the 1 % prior, zero final box layers."""
        vit_std, std = self.config.backbone_config.initializer_range, self.config.init_std
        vit_modules = {id(m) for m in self.model.backbone.backbone.modules()}
        for module in self.modules():
            in_vit = id(module) in vit_modules
            if isinstance(module, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
                if in_vit:
                    nn.init.trunc_normal_(module.weight, std=vit_std)
                else:
                    nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, ViTEmbeddings) and module.position_embeddings is not None:
                nn.init.trunc_normal_(module.position_embeddings, std=vit_std)
            elif isinstance(module, ViTBlock):
                module.gamma_1.fill_(self.config.backbone_config.cae_init_values)
                module.gamma_2.fill_(self.config.backbone_config.cae_init_values)
                if module.attn.q_bias is not None:
                    module.attn.q_bias.zero_()
                    module.attn.v_bias.zero_()
        for module in self.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        heads = self.model.encoder_heads
        for box_head in [self.bbox_embed, *heads.enc_out_bbox_embed]:
            nn.init.zeros_(box_head.layers[-1].weight)
            nn.init.zeros_(box_head.layers[-1].bias)
        self.reset_class_heads()

    @torch.no_grad()
    def reset_class_heads(self) -> None:
        """Fresh class heads (decoder and every encoder group) with the 1 % foreground prior: for a new label set."""
        prior = -math.log((1 - 0.01) / 0.01)
        for head in [self.class_embed, *self.model.encoder_heads.enc_out_class_embed]:
            nn.init.normal_(head.weight, std=self.config.init_std)
            nn.init.constant_(head.bias, prior)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> LwDetrObjectDetectionOutput | tuple:
        """pixel_values: [B, 3, H, W] normalised; pixel_mask: [B, H, W] 1 on real pixels; labels: per image
        {"class_labels": int64 [n], "boxes": float [n, 4] cxcywh in [0, 1]}. The options are transformers' (see
        `outputs.forward_options`); `return_dict=False` gives the output's non-None fields, the loss first."""
        hidden_wanted, as_dict = forward_options(
            type(self).__name__, self.config, output_hidden_states, output_attentions, return_dict, kwargs
        )
        if labels is not None and len(labels) != pixel_values.shape[0]:
            raise ValueError(f"got {len(labels)} label dicts for a batch of {pixel_values.shape[0]} images")
        out = self.model(pixel_values, pixel_mask, output_hidden_states=hidden_wanted, return_dict=True)
        enc_logits = out.enc_outputs_logits
        anchors = out.init_reference_points
        with_auxiliary = labels is not None and self.config.auxiliary_loss
        # with the auxiliary loss every layer's output goes through the heads, all layers in one pass: heads run on
        # the stacked states and are split afterwards, so the backward never scatters gradients of slices of the
        # [layers, B, Q, dim] states into zero-filled full-size buffers
        hidden = out.intermediate_hidden_states if with_auxiliary else out.last_hidden_state
        logits = self.class_embed(hidden)
        pred_boxes = refine_boxes(anchors, self.bbox_embed(hidden))
        loss = loss_dict = auxiliary = aux_logits = aux_boxes = None
        if with_auxiliary:
            aux_logits, aux_boxes, logits, pred_boxes = logits[:-1], pred_boxes[:-1], logits[-1], pred_boxes[-1]
            auxiliary = [{"logits": c, "pred_boxes": b} for c, b in zip(aux_logits, aux_boxes)]
        if labels is not None:
            loss, loss_dict = self._loss(out, logits, pred_boxes, enc_logits, labels, aux_logits, aux_boxes)
        output = LwDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary,
            init_reference_points=anchors,
            last_hidden_state=out.last_hidden_state,
            intermediate_hidden_states=out.intermediate_hidden_states,
            intermediate_reference_points=out.intermediate_reference_points,
            enc_outputs_class=enc_logits,
            enc_outputs_coord_logits=out.enc_outputs_coord_logits,
            hidden_states=out.hidden_states,
        )
        return finish_output(output, as_dict)

    def _loss(self, out: LwDetrModelOutput, logits, pred_boxes, enc_logits, labels, aux_logits, aux_boxes):
        from .loss import detection_loss

        return detection_loss(
            self.config,
            logits,
            pred_boxes,
            labels,
            aux_logits=aux_logits,
            aux_boxes=aux_boxes,
            enc_logits=enc_logits,
            enc_boxes=out.enc_outputs_coord_logits,
            group_detr=self.model.groups,
        )
