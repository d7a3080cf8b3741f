"""What a run trains with, built from its `TrainConfig`: the Accelerator, the model, the data and its datasets."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from finetune.config import TrainConfig

__all__ = ["build_model", "load_data", "make_accelerator", "make_datasets", "size_limits"]


def make_accelerator(config: TrainConfig):
    """The run's `accelerate.Accelerator` (CPU or GPU, mixed precision as configured), with the CPU threads of this
    process set."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second run in the same process (tests, the app) may want
    # another mixed precision, which the old state would refuse.
    AcceleratorState._reset_state()
    # On a machine without CUDA, cpu=True makes several processes use gloo; otherwise each would train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    if accelerator.device.type == "cpu" and config.mixed_precision == "fp16" and accelerator.is_main_process:
        # accelerate ignores fp16 on the CPU without a word
        print("finetune: --mixed-precision fp16 needs a CUDA GPU; on the CPU this run trains in float32 (bf16 is "
              "the CPU's mixed precision)", file=sys.stderr)  # fmt: skip
    if accelerator.device.type == "cpu":
        # torch gives every process a thread per core; K processes on the same cores then fight over them, and
        # oversubscribed OpenMP threads spin-wait each other (we measured steps 10x slower).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // local))
    return accelerator


def build_model(config: TrainConfig, id2label: dict[int, str]):
    """The model to fine-tune: a preset (random init) or a pretrained folder / hub id with heads for `id2label`.

    With a pretrained model, class heads whose shape changes (another number of labels) keep a fresh
    initialisation; with the same number of labels but other names they are re-initialised too, since the old
    classes mean nothing for the new ones. Everything else keeps its pretrained weights.
    """
    from lwdetr.checkpoint import load_config
    from lwdetr.config import PRESETS, preset_config
    from lwdetr.modeling import LwDetrForObjectDetection

    label2id = {name: label for label, name in id2label.items()}
    if config.model in PRESETS and not Path(config.model).exists():
        model_config = preset_config(config.model, num_labels=len(id2label), id2label=id2label, label2id=label2id)
        model = LwDetrForObjectDetection(model_config)
    else:
        base, _ = load_config(config.model)
        old = {int(k): v for k, v in base.id2label.items()}
        model = LwDetrForObjectDetection.from_pretrained(
            config.model, ignore_mismatched_sizes=True, id2label=id2label, label2id=label2id
        )
        if len(old) == len(id2label) and old != id2label:
            model.reset_class_heads()
    if config.freeze_backbone:
        model.model.backbone.backbone.requires_grad_(False)
    return model.train()


def size_limits(model) -> tuple[int, int]:
    """(size divisor, smallest square side) of the model's inputs. The smallest side leaves at least
    `num_queries` tokens on the stride-`patch` feature map, which query selection needs."""
    vit = model.model.backbone.backbone
    divisor, patch = vit.size_divisor, vit.embeddings.patch_size
    side = math.ceil(math.sqrt(model.config.num_queries)) * patch
    return divisor, math.ceil(side / divisor) * divisor


def make_datasets(config: TrainConfig, data, size_divisor: int, smallest: int):
    """(train dataset, its collate function, eval dataset); multi-scale sizes below `smallest` are left out."""
    from finetune.transforms import DetectionDataset, PreprocessCollate, build_train_transform, multiscale_sizes

    sizes = [config.image_size]
    if config.multi_scale:
        sizes = [size for size in multiscale_sizes(config.image_size, size_divisor) if size >= smallest]
    transform = build_train_transform() if config.augment else None
    train_set = DetectionDataset(data.train, transform, train=True, seed=config.seed)
    collate = PreprocessCollate(sizes, seed=config.seed, size_divisor=size_divisor)
    val_set = DetectionDataset(data.val, train=False)
    return train_set, collate, val_set


def load_data(config: TrainConfig, accelerator):
    from finetune.data import load_detection_data

    with accelerator.main_process_first():  # a zip is extracted once, by the main process, then reused
        return load_detection_data(
            config.data,
            config.val_data,
            val_fraction=config.val_fraction,
            seed=config.seed,
            work_dir=None if config.dry_run else Path(config.output) / "data",
        )
