"""Hungarian matching of predictions to targets, one group of queries at a time (Group DETR).

Each target is assigned to exactly one query of each query group by minimising a weighted sum of three costs:
a focal-style classification cost, the L1 distance between cxcywh boxes and the negative generalised IoU. The
assignment is the same as transformers' `LwDetrHungarianMatcher` (and the original LW-DETR) for the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .box_ops import at_least_float32, box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher:
    """One-to-one assignment between queries and ground-truth boxes, per image and per query group.

    Args:
        class_cost: weight of the classification cost.
        bbox_cost: weight of the L1 cost between cxcywh boxes.
        giou_cost: weight of the negative generalised IoU.
        focal_alpha, focal_gamma: shape of the focal classification cost. The reference hard-codes 0.25 and 2.0
            whatever `config.focal_alpha` says, hence these defaults.
    """

    def __init__(
        self,
        class_cost: float,
        bbox_cost: float,
        giou_cost: float,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost weight")
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def match(
        self,
        logits: Tensor,
        pred_boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        group_detr: int = 1,
    ) -> list[tuple[Tensor, Tensor]]:
        """Assign targets to queries.

        Args:
            logits: [batch_size, num_queries, num_classes] classification logits.
            pred_boxes: [batch_size, num_queries, 4] predicted boxes, cxcywh normalised.
            targets: one dict per image with "class_labels" int64 [n_i] and "boxes" [n_i, 4] (cxcywh normalised).
            group_detr: number of query groups; the queries are `group_detr` consecutive blocks of
                num_queries // group_detr, and every block gets its own full assignment.

        Returns:
            One (pred_idx, target_idx) pair of int64 CPU tensors per image, each [n_i * group_detr] (fewer when a
            group has fewer queries than targets): query `pred_idx[k]` is matched to target `target_idx[k]`.
            Group 0 comes first, rows sorted within a group, like the reference.
        """
        batch_size, num_queries = logits.shape[:2]
        if group_detr < 1 or num_queries % group_detr != 0:
            raise ValueError(f"{num_queries} queries cannot be split into {group_detr} equal groups")
        sizes = [len(target["boxes"]) for target in targets]
        # Costs in float32 whatever the autocast or the inputs' dtype: in half precision `1 - p + 1e-8` is 0 for a
        # saturated sigmoid, whose class cost would then be -inf (and, once cleaned, the worst pair, not the best).
        with torch.autocast(logits.device.type, enabled=False):
            targets = [{**target, "boxes": at_least_float32(target["boxes"])} for target in targets]
            cost = self.cost_matrix(
                at_least_float32(logits.flatten(0, 1)), at_least_float32(pred_boxes.flatten(0, 1)), targets
            )
        # One device -> host copy for the whole batch.
        cost = cost.view(batch_size, num_queries, sum(sizes)).cpu()
        group_size = num_queries // group_detr
        # Image i only competes for its own targets: its columns are the i-th chunk of the concatenated targets.
        per_image = cost.split(sizes, dim=-1)
        return [_assign_groups(per_image[i][i].numpy(), group_size, group_detr) for i in range(batch_size)]

    def cost_matrix(self, logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
        """Matching cost of every prediction against every target of the batch.

        Args:
            logits: [P, num_classes] logits of P predictions (all images' queries, flattened).
            boxes: [P, 4] cxcywh predicted boxes.
            targets: as in `match`.

        Returns:
            [P, T] cost for the T targets of all images concatenated; NaN and inf are replaced by the dtype's
            largest value, so such pairs are only chosen when nothing else is left.
        """
        target_classes = torch.cat([target["class_labels"] for target in targets])
        target_boxes = torch.cat([target["boxes"] for target in targets])
        class_cost = self._class_cost(logits.sigmoid())[:, target_classes]
        # cdist has float32 kernels only.
        l1_cost = torch.cdist(boxes.float(), target_boxes.float(), p=1).to(boxes.dtype)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        # The order of the terms is the reference's: float sums are not associative, and a different rounding
        # could flip a near-tie in the assignment.
        cost = self.bbox_cost * l1_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
        largest = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)

    def _class_cost(self, probs: Tensor) -> Tensor:
        """[P, C] sigmoid probabilities -> [P, C] cost of calling each prediction each class.

        The focal loss the prediction would get if the class were present minus the one it gets if absent:
        matching to a class the query already predicts is cheap, and, unlike plain -prob, the focal factors keep
        the cost in line with what the loss will reward. The 1e-8 keeps log() finite when a probability saturates.
        """
        alpha, gamma = self.focal_alpha, self.focal_gamma
        if_absent = (1 - alpha) * (probs**gamma) * (-(1 - probs + 1e-8).log())
        if_present = alpha * ((1 - probs) ** gamma) * (-(probs + 1e-8).log())
        # Subtracting before gathering the target columns gives the same numbers and works on [P, C], not [P, T].
        return if_present - if_absent


def _assign_groups(cost: np.ndarray, group_size: int, group_detr: int) -> tuple[Tensor, Tensor]:
    """Solve each group's [group_size, n] block of one image's [num_queries, n] cost; query indices are global."""
    pred_idx, target_idx = [], []
    for group in range(group_detr):
        start = group * group_size
        rows, cols = linear_sum_assignment(cost[start : start + group_size])
        pred_idx.append(rows + start)
        target_idx.append(cols)
    return torch.as_tensor(np.concatenate(pred_idx), dtype=torch.int64), torch.as_tensor(
        np.concatenate(target_idx), dtype=torch.int64
    )
