"""The transformers LW-DETR API with lwdetr's classes swapped in: outputs, Trainer, loading, options, processor."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from model_utils import relative_error, twin_models
from PIL import Image

from finetune.synthetic import make_synthetic_dataset
from lwdetr import Detector, ImageLoadError, LwDetrModel, LwDetrViTBackbone, ModelLoadError, images
from lwdetr.config import preset_config
from lwdetr.modeling import LwDetrForObjectDetection
from lwdetr.processing import LwDetrImageProcessor
from lwdetr.remote import fetch_url

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


# ---------------------------------------------------------------- item 2: every class loads and saves; options


def _saved_reference(twins, tmp_path: Path) -> dict[str, Path]:
    reference, _ = twins
    folders = {name: tmp_path / name for name in ("detector", "base", "vit")}
    reference.save_pretrained(folders["detector"])
    reference.model.save_pretrained(folders["base"])
    reference.model.backbone.backbone.save_pretrained(folders["vit"])
    return folders


def test_base_model_and_backbone_load_the_references_folders(twins, tmp_path):
    reference, _ = twins
    folders = _saved_reference(twins, tmp_path)
    pixels = _pixels(1)
    base = LwDetrModel.from_pretrained(folders["base"])
    vit = LwDetrViTBackbone.from_pretrained(folders["vit"])
    assert not base.training and not vit.training
    with torch.no_grad():
        expected = reference.model(pixel_values=pixels)
        got = base(pixels)
        expected_maps = reference.model.backbone.backbone(pixels).feature_maps
        got_maps = vit(pixels).feature_maps
    assert relative_error(got.enc_outputs_coord_logits, expected.enc_outputs_coord_logits) < 1e-4
    assert relative_error(got.last_hidden_state, expected.last_hidden_state) < 1e-4
    assert len(got_maps) == len(expected_maps)
    for own, theirs in zip(got_maps, expected_maps):
        assert relative_error(own, theirs) < 1e-4


def test_parts_load_from_a_detector_folder(twins, tmp_path):
    _, ours = twins
    folders = _saved_reference(twins, tmp_path)
    base = LwDetrModel.from_pretrained(folders["detector"])
    vit = LwDetrViTBackbone.from_pretrained(folders["detector"])
    assert vit.config.hidden_size == ours.config.backbone_config.hidden_size
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, ours.model.state_dict()[name]), name
    for name, tensor in vit.state_dict().items():
        assert torch.equal(tensor, ours.model.backbone.backbone.state_dict()[name]), name


def test_detector_from_a_base_model_folder_gets_fresh_heads(twins, tmp_path):
    _, ours = twins
    folders = _saved_reference(twins, tmp_path)
    with pytest.warns(UserWarning, match="class_embed, bbox_embed heads are newly initialised"):
        detector = LwDetrForObjectDetection.from_pretrained(folders["base"])
    assert torch.equal(detector.model.query_feat.weight, ours.model.query_feat.weight)


def test_a_backbone_folder_is_not_a_base_model(twins, tmp_path):
    folders = _saved_reference(twins, tmp_path)
    with pytest.raises(ModelLoadError, match="config.json: holds an LW-DETR ViT backbone") as caught:
        LwDetrModel.from_pretrained(folders["vit"])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("part", ["base", "vit"])
def test_saved_parts_load_in_transformers(twins, tmp_path, part):
    _, ours = twins
    model = ours.model if part == "base" else ours.model.backbone.backbone
    model.save_pretrained(tmp_path)
    theirs_class = transformers.LwDetrModel if part == "base" else transformers.LwDetrViTBackbone
    theirs, info = theirs_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [theirs_class.__name__]
    pixels = _pixels(2)
    with torch.no_grad():
        if part == "base":
            got, expected = model(pixels).enc_outputs_coord_logits, theirs.eval()(pixel_values=pixels)[5]
        else:
            got, expected = model(pixels).feature_maps[-1], theirs.eval()(pixels).feature_maps[-1]
    assert relative_error(got, expected) < 1e-4


def test_hidden_states_are_the_references(twins):
    reference, ours = twins
    pixels = _pixels(3)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels, output_hidden_states=True)
        expected_vit = reference.model.backbone.backbone(pixels, output_hidden_states=True)
        got_vit = ours.model.backbone.backbone(pixels, output_hidden_states=True)
        plain = ours(pixels)
    assert "hidden_states" not in plain
    assert len(got.hidden_states) == len(expected.hidden_states) == ours.config.decoder_layers + 1
    for own, theirs in zip(got.hidden_states, expected.hidden_states):
        assert own.shape == theirs.shape and relative_error(own, theirs) < 1e-4
    assert len(got_vit.hidden_states) == len(expected_vit.hidden_states)
    for own, theirs in zip(got_vit.hidden_states, expected_vit.hidden_states):
        assert own.shape == theirs.shape and relative_error(own, theirs) < 1e-4


@pytest.mark.parametrize("part", ["detector", "base", "vit"])
def test_unsupported_options_are_refused_clearly(twins, part):
    _, ours = twins
    model = {"detector": ours, "base": ours.model, "vit": ours.model.backbone.backbone}[part]
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(_pixels(), output_attentions=True)
    with pytest.raises(ValueError, match="unsupported argument.*use_cache"):
        model(_pixels(), use_cache=True)


# ---------------------------------------------------------------- item 3: device_map and dtype


@pytest.fixture(scope="module")
def detector_folder(twins, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("detector")
    twins[1].save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("options", "dtype"),
    [
        ({"dtype": torch.bfloat16}, torch.bfloat16),
        ({"dtype": "float16"}, torch.float16),
        ({"torch_dtype": torch.bfloat16}, torch.bfloat16),
        ({"dtype": "auto"}, torch.float32),
        ({"device_map": "cpu"}, torch.float32),
        ({"device_map": "auto", "dtype": "bfloat16"}, torch.bfloat16),
        ({"device_map": {"": "cpu"}}, torch.float32),
    ],
)
def test_dtype_and_single_device_maps_are_honoured(detector_folder, options, dtype):
    model = LwDetrForObjectDetection.from_pretrained(detector_folder, **options)
    expected_device = "cuda" if options.get("device_map") == "auto" and torch.cuda.is_available() else "cpu"
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device.type for p in model.parameters()} == {expected_device}
    assert not hasattr(model.config, "device_map")  # once stored there and ignored
    vit = LwDetrViTBackbone.from_pretrained(detector_folder, **options)
    assert vit.dtype == dtype


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device_map": {"model.backbone": "cpu", "model.decoder": "cuda:0"}}, "spreads the model over"),
        ({"device_map": "balanced"}, "onto one device"),
        ({"device_map": "nowhere"}, "not a device"),
        ({"device_map": 99}, "no such CUDA device"),
        ({"dtype": "int8"}, "not a floating-point"),
        ({"dtype": "bfloat16", "torch_dtype": "float16"}, "not both"),
    ],
)
def test_unsupported_placements_are_refused(detector_folder, options, message):
    with pytest.raises(ValueError, match=message) as caught:
        LwDetrModel.from_pretrained(detector_folder, **options)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- item 4: config fields the reference honours


def _run_to_run_difference(model: torch.nn.Module, grad: bool) -> float:
    pixels = _pixels(4)
    with torch.set_grad_enabled(grad):
        first, second = (model(pixels).feature_maps[-1] for _ in range(2))
    return relative_error(first, second)


@pytest.mark.parametrize("grad", [True, False])
def test_vit_dropout_prob_applies_in_training_only(grad, tmp_path):
    config = preset_config("nano", backbone={"dropout_prob": 0.3}).backbone_config
    torch.manual_seed(0)
    reference = transformers.LwDetrViTBackbone(config).train()
    reference.save_pretrained(tmp_path)
    ours = LwDetrViTBackbone.from_pretrained(tmp_path).train()
    reference_difference = _run_to_run_difference(reference, grad)
    difference = _run_to_run_difference(ours, grad)
    assert reference_difference > 1e-3 and 0.2 * reference_difference < difference < 5 * reference_difference
    assert _run_to_run_difference(ours.eval(), grad) == 0.0
    without = LwDetrViTBackbone(preset_config("nano").backbone_config).train()
    assert _run_to_run_difference(without, grad) == 0.0


# ---------------------------------------------------------------- item 5: the processor for training


_ANNOTATIONS = [
    {
        "image_id": 3,
        "annotations": [
            {"bbox": [10, 20, 30, 40], "category_id": 2, "area": 1200, "iscrowd": 0},
            {"bbox": [190, 90, 30, 40], "category_id": 1, "area": 100, "iscrowd": 0},  # clipped by the image
            {"bbox": [5, 5, 10, 10], "category_id": 4, "area": 100, "iscrowd": 1},  # crowd: dropped
            {"bbox": [50, 50, 0, 10], "category_id": 0, "area": 0, "iscrowd": 0},  # empty: dropped
        ],
    },
    {"image_id": 4, "annotations": []},
    {"image_id": 5, "annotations": [{"bbox": [1.5, 2.5, 20, 30.5], "category_id": 0, "area": 610, "iscrowd": 0}]},
]


def _annotated_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(100, 200), (90, 60), (64, 64)]
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"size": {"height": 128, "width": 160}},
        {"size": {"shortest_edge": 64, "longest_edge": 100}},
        {"size": {"shortest_edge": 64, "longest_edge": 100}, "do_pad": False},
    ],
)
def test_annotations_give_the_references_labels(options):
    images = _annotated_images() if options.get("do_pad", True) else _annotated_images()[2:]
    annotations = _ANNOTATIONS if options.get("do_pad", True) else _ANNOTATIONS[2:]
    reference = transformers.DeformableDetrImageProcessor(**options)
    expected = reference(images=images, annotations=annotations, return_tensors="pt")
    got = LwDetrImageProcessor(**options)(images, annotations=annotations)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert len(got["labels"]) == len(expected["labels"])
    for own, theirs in zip(got["labels"], expected["labels"]):
        assert list(own) == list(theirs)
        for key, value in theirs.items():
            assert own[key].dtype == value.dtype and own[key].shape == value.shape, key
            assert torch.allclose(own[key], value, rtol=1e-5, atol=1e-6), key
    if "height" in options["size"]:  # a size the nano model takes: the labels train it as the guide's Trainer does
        model = LwDetrForObjectDetection(preset_config("nano", num_labels=5)).train()
        assert torch.isfinite(model(got["pixel_values"], got["pixel_mask"], labels=got["labels"]).loss)


@pytest.mark.parametrize("return_tensors", ["np", None])
def test_numpy_and_list_outputs_as_the_reference(return_tensors):
    images = _annotated_images()
    options = {"size": {"height": 64, "width": 96}}
    expected = transformers.DeformableDetrImageProcessor(**options)(
        images=images, annotations=_ANNOTATIONS, return_tensors=return_tensors
    )
    got = LwDetrImageProcessor(**options)(images, annotations=_ANNOTATIONS, return_tensors=return_tensors)
    for key in ("pixel_values", "pixel_mask"):
        assert type(got[key]) is type(expected[key])
        assert np.array_equal(np.asarray(got[key]), np.asarray(expected[key])), key
    assert type(got["labels"][0]["boxes"]) is type(expected["labels"][0]["boxes"]) is np.ndarray
    assert np.allclose(got["labels"][0]["boxes"], expected["labels"][0]["boxes"], atol=1e-6)


def test_pad_to_the_batch_and_its_labels():
    processor = LwDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 100}, do_pad=False)
    images = _annotated_images()
    singles = [processor(image, annotations=a) for image, a in zip(images, _ANNOTATIONS)]
    padded = processor.pad([s["pixel_values"][0] for s in singles], annotations=[s["labels"][0] for s in singles])
    expected = LwDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 100})(images, annotations=_ANNOTATIONS)
    assert torch.equal(padded["pixel_values"], expected["pixel_values"])
    assert torch.equal(padded["pixel_mask"], expected["pixel_mask"])
    for own, theirs in zip(padded["labels"], expected["labels"]):
        assert torch.allclose(own["boxes"], theirs["boxes"]) and torch.equal(own["size"], theirs["size"])


def test_processor_json_and_bad_annotations(tmp_path):
    processor = LwDetrImageProcessor(size={"height": 64, "width": 64})
    text = processor.to_json_string()
    assert json.loads(text) == processor.to_dict()
    assert processor.save_pretrained(tmp_path).read_text() == text
    with pytest.raises(ValueError, match=r"annotations\[0\]: not a COCO detection annotation") as caught:
        processor(_annotated_images()[:1], annotations=[{"image_id": 1, "annotations": [{"box": [1, 2, 3, 4]}]}])
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="return_tensors must be"):
        processor(_annotated_images()[:1], return_tensors="tf")


# ---------------------------------------------------------------- item 6: URLs and the pipeline's shape

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def image_server():
    """A local http server over examples/images on 127.0.0.1 (no network), and its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(EXAMPLES / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def demo_detector() -> Detector:
    return Detector.from_pretrained(EXAMPLES / "demo_model", device="cpu")


def test_predict_takes_an_http_url(demo_detector, image_server):
    path = EXAMPLES / "images" / "shapes_1.jpg"
    from_url = demo_detector.predict(f"{image_server}/shapes_1.jpg", threshold=0.3)
    assert from_url and from_url == demo_detector.predict(path, threshold=0.3)
    both = demo_detector.predict([f"{image_server}/shapes_2.jpg", path], threshold=0.3)
    assert both[1] == from_url


def test_bad_urls_give_one_line_errors(demo_detector, image_server):
    with socket.socket() as probe:  # a port nothing listens on: the same failure as being offline
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/x.jpg"
    cases = [
        (closed, "cannot download"),
        (f"{image_server}/missing.jpg", "HTTP 404"),
        (f"{image_server}/", "not a recognised image file"),  # the folder listing
    ]
    for url, message in cases:
        with pytest.raises(ImageLoadError, match=message) as caught:
            demo_detector.predict(url)
        assert str(caught.value).startswith(url) and "\n" not in str(caught.value)
    with pytest.raises(ImageLoadError, match="18,565 bytes, more than the limit of 1,000"):
        fetch_url(f"{image_server}/shapes_1.jpg", max_bytes=1000)
    with pytest.raises(ImageLoadError, match="only http and https"):
        fetch_url("ftp://127.0.0.1/x.jpg")
    with pytest.raises(ImageLoadError, match="no such file"):  # not fetched: any other scheme is a path
        demo_detector.predict("file:///etc/hostname")


def test_url_downloads_respect_the_image_byte_cap(demo_detector, image_server, monkeypatch):
    monkeypatch.setattr(images, "DEFAULT_MAX_IMAGE_BYTES", 1000)
    with pytest.raises(ImageLoadError, match="bytes, more than the limit of 1,000"):
        demo_detector.predict(f"{image_server}/shapes_1.jpg")


def test_pipeline_output_matches_transformers_pipeline(demo_detector, image_server):
    paths = [str(p) for p in sorted((EXAMPLES / "images").glob("*.jpg"))]
    pipe = transformers.pipeline("object-detection", model=str(EXAMPLES / "demo_model"), device="cpu")
    expected = pipe(paths, threshold=0.5)
    got = demo_detector.predict(paths, threshold=0.5, output="pipeline")
    assert sum(map(len, expected)) >= 3, "the demo model should find shapes"
    for mine, theirs in zip(got, expected):
        assert [d["label"] for d in mine] == [d["label"] for d in theirs]
        for own, reference in zip(mine, theirs):
            assert set(own) == set(reference) and set(own["box"]) == set(reference["box"])
            assert abs(own["score"] - reference["score"]) < 1e-3
            assert all(abs(own["box"][k] - reference["box"][k]) <= 1 for k in reference["box"])
    single = demo_detector.predict(f"{image_server}/shapes_1.jpg", threshold=0.5, output="pipeline")
    assert single == got[0]
