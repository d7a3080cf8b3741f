"""The transformers LW-DETR API with lwdetr's classes swapped in: outputs, Trainer, loading, options, processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from model_utils import relative_error, twin_models
from PIL import Image

from finetune.synthetic import make_synthetic_dataset
from lwdetr.config import preset_config
from lwdetr.modeling import LwDetrForObjectDetection

# transformers' deformable attention warns about non-power-of-two head sizes of the nano test model.
pytestmark = pytest.mark.filterwarnings("ignore:You'd better set embed_dim")


@pytest.fixture(scope="module")
def twins():
    reference, ours = twin_models("nano")
    return reference.eval(), ours.eval()


def _pixels(seed: int = 0, size: int = 128) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- item 1: ModelOutput, return_dict, Trainer


def test_outputs_index_unpack_and_list_keys_as_the_reference(twins):
    reference, ours = twins
    with torch.no_grad():
        expected = reference(pixel_values=_pixels())
        got = ours(_pixels())
        expected_tuple = reference(pixel_values=_pixels(), return_dict=False)
        got_tuple = ours(_pixels(), return_dict=False)
    assert list(got.keys()) == list(expected.keys())
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(expected_tuple) == len(got.to_tuple())
    assert torch.equal(got[0], got.logits) and torch.equal(got["pred_boxes"], got[1])
    for own, theirs in zip(got_tuple, expected_tuple):
        assert own.shape == theirs.shape
    assert relative_error(got[1], expected[1]) < 1e-4  # boxes: no top-k near-ties on this input


def test_training_outputs_start_with_the_loss():
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=2)).train()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]])}]
    out = model(_pixels(), labels=labels)
    assert out[0] is out.loss and list(out.keys())[:2] == ["loss", "loss_dict"]
    loss, loss_dict = model(_pixels(), labels=labels, return_dict=False)[:2]
    assert loss.dim() == 0 and "loss_ce" in loss_dict


def test_model_outputs_index_and_return_tuples(twins):
    _, ours = twins
    with torch.no_grad():
        out = ours.model(_pixels())
        as_tuple = ours.model(_pixels(), return_dict=False)
    assert torch.equal(out[0], out.init_reference_points)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.last_hidden_state)


class _ShapesDataset(torch.utils.data.Dataset):
    """A COCO export of `make_synthetic_dataset` as the fine-tuning guide's dataset: pixel_values and labels with
    class_labels and normalised cxcywh boxes."""

    def __init__(self, folder: Path):
        coco = json.loads((folder / "_annotations.coco.json").read_text())
        self.images = coco["images"]
        self.boxes = {image["id"]: [] for image in self.images}
        for annotation in coco["annotations"]:
            self.boxes[annotation["image_id"]].append((annotation["category_id"] - 1, annotation["bbox"]))
        self.folder = folder
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        self.normalise = lambda x: (x - mean[:, None, None]) / std[:, None, None]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        info = self.images[index]
        image = np.asarray(Image.open(self.folder / info["file_name"]).convert("RGB"), dtype=np.float32) / 255
        width, height = info["width"], info["height"]
        boxes = torch.tensor([b for _, b in self.boxes[info["id"]]], dtype=torch.float32)
        cxcywh = torch.cat((boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]), 1) / torch.tensor([width, height] * 2)
        classes = torch.tensor([c for c, _ in self.boxes[info["id"]]])
        return {
            "pixel_values": self.normalise(torch.from_numpy(image).permute(2, 0, 1)),
            "labels": {"class_labels": classes, "boxes": cxcywh},
        }


def _collate(batch: list[dict]) -> dict:
    """The object-detection guide's collator."""
    return {"pixel_values": torch.stack([x["pixel_values"] for x in batch]), "labels": [x["labels"] for x in batch]}


def test_trainer_fine_tunes_and_the_loss_falls(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=1, image_size=128, seed=1) / "train"
    dataset = _ShapesDataset(folder)
    torch.manual_seed(0)
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=3))
    fixed = _collate([dataset[i] for i in range(len(dataset))])

    def fixed_loss() -> float:
        model.train()
        with torch.no_grad():
            return model(**fixed).loss.item()

    before = fixed_loss()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        weight_decay=1e-4,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert result.global_step == 8
    after = fixed_loss()
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert after < 0.9 * before, (before, after)
