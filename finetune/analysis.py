"""What a finished run learned, shown before its weights are downloaded: `run/analysis/`.

`write_analysis` scores a model's validation detections once more with pycocotools and writes, into the run folder:

    analysis/analysis.json   per class: ground-truth boxes, AP@[.5:.95], AP50; and its precision-recall curve at
                             IoU 0.5 (precision at COCO's 101 recall points, area "all", 100 detections per image)
    analysis/pr_curves.png   those curves, one line per class with ground truth
    analysis/gallery/*.png   up to `GALLERY_SIZE` validation images: predictions (left) beside ground truth (right)

The folder is written whole under a temporary name and swapped in (`finetune.export.atomic_folder`), so a reader
sees the previous analysis or the new one, never half of one. `write_onnx` puts `model.onnx` (or, without the onnx
package, `ONNX_MISSING.txt` saying so) beside it, for the downloadable bundle. `analyse_run` (or
`python -m finetune.analysis RUN_DIR`) does all of it on demand for a finished run folder (the model it offers, best/
else last/, on its own validation split); `train` calls the same at the end of a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.errors import DataError
from finetune.evaluate import run_cocoeval
from finetune.export import atomic_folder, atomic_write_text
from finetune.result import offered_model_dir

__all__ = [
    "ANALYSIS_DIR",
    "GALLERY_SIZE",
    "ONNX_FILE",
    "ONNX_MISSING_FILE",
    "analyse_run",
    "class_analysis",
    "read_analysis",
    "write_analysis",
    "write_onnx",
]

ANALYSIS_DIR = "analysis"
SUMMARY_FILE = "analysis.json"
PR_PLOT = "pr_curves.png"
GALLERY_DIR = "gallery"
GALLERY_SIZE = 8
ONNX_FILE = "model.onnx"
ONNX_MISSING_FILE = "ONNX_MISSING.txt"
_PANEL_SIDE = 480  # gallery panels are scaled down to this longest side: small files, readable tags
_GAP = 8


def class_analysis(
    ground_truth: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], id2label: Mapping[int, str]
) -> dict[str, Any]:
    """Per-class AP and precision-recall curves of `detections` against a COCO ground-truth dict.

    Returns `{"classes": [{"class", "label_id", "boxes", "AP", "AP50"}, ...] (every class of `id2label`, in label
    order; AP and AP50 None for a class without ground truth), "recall": [101 recall points], "precision":
    {class name: [101 precisions at IoU 0.5]} (classes with ground truth)}`. No detections: every AP is 0.
    """
    boxes = {label: 0 for label in id2label}
    for annotation in ground_truth["annotations"]:
        if not annotation.get("iscrowd", 0):
            boxes[annotation["category_id"]] = boxes.get(annotation["category_id"], 0) + 1
    evaluator = run_cocoeval(ground_truth, detections)
    recall = [round(i / 100, 2) for i in range(101)]
    rows, curves = [], {}
    for label, name in sorted(id2label.items()):
        row = {"class": name, "label_id": int(label), "boxes": boxes[label], "AP": None, "AP50": None}
        if boxes[label]:
            row["AP"], row["AP50"], curve = _class_values(evaluator, label)
            curves[name] = curve
        rows.append(row)
    if evaluator is not None:
        recall = [round(float(r), 2) for r in evaluator.params.recThrs]
    return {"classes": rows, "recall": recall, "precision": curves}


def _class_values(evaluator, label: int) -> tuple[float, float, list[float]]:
    """(AP@[.5:.95], AP50, precision at IoU .5 per recall point) of one class; all 0 without an evaluator."""
    if evaluator is None:
        return 0.0, 0.0, [0.0] * 101
    # precision: [iou, recall, category, area, max_dets]; area "all" is 0, 100 detections is the last.
    precision = evaluator.eval["precision"][:, :, list(evaluator.params.catIds).index(label), 0, -1]
    valid = precision[precision > -1]
    ap = float(valid.mean()) if valid.size else 0.0
    at_50 = precision[0]
    ap50 = float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else 0.0
    return ap, ap50, [round(float(max(p, 0.0)), 4) for p in at_50]


def write_analysis(
    run_dir: str | os.PathLike,
    split,
    detections: Sequence[Mapping[str, Any]],
    score_threshold: float = 0.3,
    gallery_size: int = GALLERY_SIZE,
) -> Path:
    """Write `run_dir/analysis/` (see the module docstring) for `detections` (COCO, original pixels) on `split`
    (a `finetune.data.DetectionSplit`); the gallery draws predictions scoring at least `score_threshold`."""
    summary = class_analysis(split.to_coco_gt(), detections, split.id2label)
    summary["images"] = len(split)
    summary["score_threshold"] = score_threshold
    path = Path(run_dir) / ANALYSIS_DIR
    with atomic_folder(path) as staging:
        (staging / SUMMARY_FILE).write_text(json.dumps(summary), encoding="utf-8")
        _plot_curves(summary, staging / PR_PLOT)
        gallery = staging / GALLERY_DIR
        gallery.mkdir()
        by_image: dict[int, list] = {}
        for detection in detections:
            by_image.setdefault(detection["image_id"], []).append(detection)
        shown = 0
        for record in (record for record in split.records if len(record.boxes)):
            if shown == gallery_size:
                break
            try:
                picture = _side_by_side(record, by_image.get(record.image_id, []), split.id2label, score_threshold)
            except DataError:  # an image that went bad since training: the gallery shows the next one
                continue
            picture.save(gallery / f"{shown:02d}_{Path(record.file_name).stem[:60]}.png")
            shown += 1
    return path


def _plot_curves(summary: Mapping[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=100)
    aps = {row["class"]: row["AP50"] for row in summary["classes"]}
    for name, precision in summary["precision"].items():
        axes.plot(summary["recall"], precision, label=f"{name} (AP50 {aps[name]:.2f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall at IoU 0.5")
    axes.grid(alpha=0.3)
    if summary["precision"]:
        axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)


def _side_by_side(record, detections: Sequence[Mapping[str, Any]], id2label, threshold: float) -> Image.Image:
    """Predictions drawn on the left copy of the image, ground truth on the right, scaled to `_PANEL_SIDE`."""
    from lwdetr.draw import draw_detections
    from lwdetr.postprocess import Detection

    image = record.load_image()
    scale = min(1.0, _PANEL_SIDE / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))

    def detection(label: int, score: float, box: Sequence[float]) -> Detection:
        x, y, w, h = (v * scale for v in box)
        return Detection(int(label), id2label.get(int(label), str(label)), float(score), (x, y, x + w, y + h))

    kept = sorted((d for d in detections if d["score"] >= threshold), key=lambda d: d["score"])
    predicted = [detection(d["category_id"], d["score"], d["bbox"]) for d in kept]
    truth = [detection(label, 1.0, box) for box, label in zip(record.boxes.tolist(), record.labels.tolist())]
    font = max(10, round(max(image.size) / 32))
    left = draw_detections(image, predicted, font_size=font)
    right = draw_detections(image, truth, show_scores=False, font_size=font)
    canvas = Image.new("RGB", (image.width * 2 + _GAP, image.height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (image.width + _GAP, 0))
    return canvas


def write_onnx(model, image_size: int, run_dir: str | os.PathLike) -> Path:
    """`run_dir/model.onnx` of `model` at `image_size` (written beside, then renamed), or, when the onnx package
    is missing or the export fails, `run_dir/ONNX_MISSING.txt` saying why (a finished run stays finished); returns
    the file written. A full disk is raised, as everywhere."""
    from lwdetr.onnx_export import ONNX_MISSING, OnnxMissingError, export_onnx

    run_dir = Path(run_dir)
    target = run_dir / ONNX_FILE
    partial = run_dir / f".{ONNX_FILE}.partial"
    try:
        export_onnx(model, partial, image_size=(image_size, image_size))
    except (OnnxMissingError, RuntimeError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = ONNX_MISSING if isinstance(error, OnnxMissingError) else f"the export failed: {_first_line(error)}"
        atomic_write_text(run_dir / ONNX_MISSING_FILE, f"model.onnx is not included: {reason}\n")
        return run_dir / ONNX_MISSING_FILE
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.chmod(partial, 0o644)
    os.replace(partial, target)
    (run_dir / ONNX_MISSING_FILE).unlink(missing_ok=True)
    return target


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def read_analysis(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's analysis.json, plus `"pr_plot"` and `"gallery"` (paths of its files); None when there is none."""
    folder = Path(run_dir) / ANALYSIS_DIR
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    plot = folder / PR_PLOT
    summary["pr_plot"] = plot if plot.is_file() else None
    summary["gallery"] = sorted((folder / GALLERY_DIR).glob("*.png"))
    return summary


def analyse_run(run_dir: str | os.PathLike, batch_size: int = 8, onnx: bool = True) -> Path:
    """Analyse a finished run on demand: the model it offers (`offered_model_dir`: best/, else last/) on its
    validation split, as configured in its saved state; writes `analysis/` and, with `onnx`, model.onnx. Returns
    the analysis folder."""
    import torch

    from finetune.config import load_run_config
    from finetune.data import load_detection_data
    from finetune.errors import ConfigError
    from finetune.evaluate import predict_detections
    from finetune.transforms import DetectionDataset, PreprocessCollate
    from lwdetr.modeling import LwDetrForObjectDetection

    run_dir = Path(run_dir)
    model_dir = offered_model_dir(run_dir)
    if model_dir is None:
        raise ConfigError(f"run {run_dir.name} has no saved model (best/ or last/)")
    config = load_run_config(run_dir)
    data = load_detection_data(
        config.data, config.val_data, val_fraction=config.val_fraction, seed=config.seed, work_dir=run_dir / "data"
    )
    model = LwDetrForObjectDetection.from_pretrained(model_dir).eval()
    dataset = DetectionDataset(data.val, train=False)
    collate = PreprocessCollate([config.image_size])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    detections = predict_detections(model, loader, torch.device("cpu"))
    if onnx:
        write_onnx(model, config.image_size, run_dir)
    return write_analysis(run_dir, data.val, detections)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m finetune.analysis RUN_DIR [--no-onnx]`: analyse a finished run again and print where."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune.analysis", description=main.__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder of python -m finetune (with best/ or last/)")
    parser.add_argument("--no-onnx", action="store_true", help="do not export model.onnx")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from finetune.errors import ConfigError

    try:
        print(analyse_run(args.run_dir, batch_size=args.batch_size, onnx=not args.no_onnx))
    except (ConfigError, DataError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
