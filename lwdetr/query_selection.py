"""Mixed query selection: encoder tokens become box proposals, and the top-scoring ones seed the decoder."""

from __future__ import annotations

import torch
from torch import nn

from .layers import MLP, refine_boxes

__all__ = ["token_proposals", "EncoderHeads"]


def token_proposals(
    memory: torch.Tensor, padding: torch.Tensor, spatial_shapes: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One anchor box per encoder token: centred on its cell, 0.05 * 2**level wide, relative to the valid area.

    memory: [batch, tokens, dim]; padding: [batch, tokens] True on padded pixels.
    Returns (memory with invalid tokens zeroed, anchors [batch, tokens, 4] cxcywh with invalid ones zeroed,
    invalid [batch, tokens, 1] True for padded tokens and anchors not strictly inside (0.01, 0.99)).
    """
    batch = memory.shape[0]
    anchors, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes):
        level_padding = padding[:, start : start + height * width].view(batch, height, width)
        valid_h = (~level_padding[:, :, 0]).sum(1)
        valid_w = (~level_padding[:, 0, :]).sum(1)
        ys = torch.linspace(0, height - 1, height, dtype=memory.dtype, device=memory.device)
        xs = torch.linspace(0, width - 1, width, dtype=memory.dtype, device=memory.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((grid_x, grid_y), -1)[None] + 0.5  # [1, h, w, 2]
        scale = torch.stack((valid_w, valid_h), -1).view(batch, 1, 1, 2).to(memory.dtype)
        centres = centres / scale
        sizes = torch.full_like(centres, 0.05 * (2.0**level))
        anchors.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
        start += height * width
    anchors = torch.cat(anchors, 1)
    inside = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)
    invalid = padding[..., None] | ~inside
    return memory.masked_fill(invalid, 0.0), anchors.masked_fill(invalid, 0.0), invalid


class EncoderHeads(nn.Module):
    """Per-group projection, norm and class/box heads that score every encoder token as a proposal."""

    def __init__(self, dim: int, num_labels: int, groups: int):
        super().__init__()
        self.enc_output = nn.ModuleList(nn.Linear(dim, dim) for _ in range(groups))
        self.enc_output_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(groups))
        self.enc_out_class_embed = nn.ModuleList(nn.Linear(dim, num_labels) for _ in range(groups))
        self.enc_out_bbox_embed = nn.ModuleList(MLP(dim, dim, 4, num_layers=3) for _ in range(groups))

    def project(self, group: int, tokens: torch.Tensor) -> torch.Tensor:
        """[..., dim] tokens -> group `group`'s proposal features (linear + LayerNorm), [..., dim]."""
        return self.enc_output_norm[group](self.enc_output[group](tokens))

    def select(
        self, group: int, tokens: torch.Tensor, anchors: torch.Tensor, invalid: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k proposals of one group.

        tokens: [batch, T, dim], anchors: [batch, T, 4], invalid: [batch, T, 1].
        Returns (boxes [batch, k, 4] with gradient, class logits [batch, k, C], the selected tokens [batch, k, dim]).
        """
        # the scores only choose the winners: no gradient flows through them, so they need no graph
        with torch.no_grad():
            features = self.project(group, tokens)
            # best class per token, then the mask ([batch, T] rather than [batch, T, C]; amax keeps no indices)
            scores = self.enc_out_class_embed[group](features).amax(-1).masked_fill(invalid[..., 0], float("-inf"))
            top = scores.topk(k, dim=1).indices  # [batch, k]
        if torch.is_grad_enabled():
            # project the k winners again, with autograd: the backward then runs over k tokens rather than all T
            picked = self.project(group, torch.gather(tokens, 1, top[..., None].expand(-1, -1, tokens.shape[-1])))
        else:
            picked = torch.gather(features, 1, top[..., None].expand(-1, -1, features.shape[-1]))
        # only the k winners need box deltas and their class logits (recomputed, so never -inf)
        picked_anchors = torch.gather(anchors, 1, top[..., None].expand(-1, -1, 4))
        boxes = refine_boxes(picked_anchors, self.enc_out_bbox_embed[group](picked))
        return boxes, self.enc_out_class_embed[group](picked), picked
