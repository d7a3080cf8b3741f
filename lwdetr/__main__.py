"""Command line: `python -m lwdetr predict ...` (detect objects) and `python -m lwdetr convert ...` (import weights).

Exit codes: 0 success; 1 a fatal error (model or checkpoint unusable), reported in one line naming the file; 2 some
inputs could not be read (each reported in one line on stderr, the others still processed and their results
written) or the command line (or the LWDETR_MAX_IMAGE_BYTES setting) was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PRESETS

if TYPE_CHECKING:  # the detector imports torch: only when a command needs it
    from .detector import Prediction

_EXIT_FATAL = 1
_EXIT_BAD_INPUTS = 2
# From this many images on a progress bar is worth its screen line (shown only when stderr is a terminal, so
# that logs and pipes get the one-line messages and nothing else).
_PROGRESS_MIN_IMAGES = 4

_PREDICT_EPILOG = """\
examples:
  python -m lwdetr predict photos/ --model AnnaZhang/lwdetr_small_60e_coco --output results.json
  python -m lwdetr predict a.jpg b.png --model ./my_model --threshold 0.3 --save-annotated annotated/

The results file is a COCO "results" list, one record per detection:
  {"image_id": 0, "file_name": "photos/a.jpg", "category_id": 3, "bbox": [x, y, width, height], "score": 0.91}
image_id is the image's index in the sorted list of inputs; category_id is the model's class id.
"""

_CONVERT_EPILOG = """\
example:
  python -m lwdetr convert LWDETR_small_60e_coco.pth --size small --output lwdetr_small_coco/

The folder gets config.json, model.safetensors (transformers' key names) and preprocessor_config.json (640x640);
it loads with lwdetr.Detector and with transformers.LwDetrForObjectDetection. The .pth is read with
torch.load(weights_only=True): files that hold arbitrary Python objects are refused.
"""


def build_parser() -> argparse.ArgumentParser:
    """The `lwdetr` argument parser with its `predict` and `convert` subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m lwdetr",
        description="LW-DETR, a light-weight detection transformer: detect objects in images, import checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(commands)
    _add_convert(commands)
    _add_export(commands)
    return parser


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict",
        help="detect objects in images and folders of images",
        description="Detect objects and write COCO-format results.\n"
        "Unreadable inputs are reported on stderr, one line each, and skipped; the exit code is then 2.\n"
        "Only JPEG, PNG, WebP, BMP, GIF and TIFF are decoded; files larger than LWDETR_MAX_IMAGE_BYTES\n"
        "(default 256 MiB) or than 64 megapixels, and FIFOs or devices, are skipped.\n"
        "A progress bar shows on a terminal from 4 images on.",
        epilog=_PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="image files and/or folders; folders are searched recursively for "
        ".jpg .jpeg .png .bmp .webp .tif .tiff files (hidden files skipped)",
    )  # fmt: skip
    predict.add_argument(
        "--model", required=True, metavar="M",
        help="model folder (config.json + model.safetensors [+ preprocessor_config.json]) or Hugging Face hub id",
    )  # fmt: skip
    predict.add_argument(
        "--threshold", type=_probability, default=0.5, metavar="T",
        help="keep detections whose score is above T, between 0 and 1 (default: 0.5)",
    )  # fmt: skip
    predict.add_argument(
        "--output", metavar="FILE",
        help="write the COCO results JSON to FILE (default: standard output)",
    )  # fmt: skip
    predict.add_argument(
        "--batch-size", type=_positive_int, default=8, metavar="N",
        help="images per forward pass (default: 8)",
    )  # fmt: skip
    predict.add_argument(
        "--max-detections", type=_positive_int, default=100, metavar="K",
        help="at most K detections per image, best first (default: 100)",
    )  # fmt: skip
    predict.add_argument(
        "--save-annotated", metavar="DIR",
        help="also save each image with its boxes, labels and scores drawn on it into DIR (created if needed)",
    )  # fmt: skip
    predict.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where to run the model; auto picks cuda when available, else cpu (default: auto)",
    )  # fmt: skip
    predict.set_defaults(run=_run_predict)


def _add_convert(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser(
        "convert",
        help="import an original Atten4Vis LW-DETR .pth checkpoint into a model folder",
        description="Convert an original LW-DETR checkpoint (the .pth files published with the paper)\n"
        "into a Hugging Face-format model folder.",
        epilog=_CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("checkpoint", metavar="ORIGINAL.pth", help="the original checkpoint file")
    convert.add_argument(
        "--size", required=True, choices=[name for name in PRESETS if name != "nano"],
        help="the architecture the checkpoint was trained with",
    )  # fmt: skip
    convert.add_argument("--output", required=True, metavar="DIR", help="folder to write the converted model into")
    convert.add_argument(
        "--num-labels", type=_positive_int, metavar="N",
        help="number of classes; by default read from the checkpoint's class head (91 for COCO, 366 for Objects365)",
    )  # fmt: skip
    convert.set_defaults(run=_run_convert)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _error(message: str) -> None:
    print(f"lwdetr: error: {message}", file=sys.stderr)


def _run_predict(args: argparse.Namespace) -> int:
    import torch

    from .cpu import kernel_status, start_background_build
    from .detector import Detector
    from .images import find_images, max_image_bytes_setting

    try:
        max_image_bytes_setting()  # an unusable setting is the user's to fix, not one error per image
    except ValueError as error:
        _error(str(error))
        return _EXIT_BAD_INPUTS
    paths = find_images(args.paths)
    if not paths:
        _error(f"no image files found in {', '.join(args.paths)}")
        return _EXIT_BAD_INPUTS
    if args.device == "cuda" and not torch.cuda.is_available():
        _error("--device cuda was requested but CUDA is not available")
        return _EXIT_FATAL
    try:
        detector = Detector.from_pretrained(args.model, device=args.device)
    except (OSError, ValueError, RuntimeError) as error:  # missing model, or weights that do not fit its config
        _error(str(error).splitlines()[0] if str(error) else type(error).__name__)
        return _EXIT_FATAL
    # our CPU kernels build (once per machine) while the first images run PyTorch's ops
    on_cpu = detector.device.type == "cpu"
    kernel_build = start_background_build() if on_cpu else None
    records, failed = _predict_all(detector, paths, args)
    _write_results(records, args.output)
    if kernel_build is not None and kernel_build.is_alive():  # let the first build finish: later runs use it
        print("lwdetr: finishing the CPU kernel build (once per machine)", file=sys.stderr)
        kernel_build.join()
    if on_cpu:
        print(f"lwdetr: {kernel_status()}", file=sys.stderr)
    where = args.output or "standard output"
    print(f"lwdetr: {len(records)} detections in {len(paths) - failed} images written to {where}", file=sys.stderr)
    if failed:
        print(f"lwdetr: {failed} of {len(paths)} inputs could not be read", file=sys.stderr)
    return _EXIT_BAD_INPUTS if failed else 0


def _predict_all(detector, paths: list[Path], args: argparse.Namespace) -> tuple[list[dict], int]:
    """Run the detector over `paths`, reporting bad inputs as they come; returns (COCO records, failures)."""
    from tqdm import tqdm

    from .draw import draw_detections

    records: list[dict] = []
    failed = 0
    annotated_names: set[str] = set()
    quiet = len(paths) < _PROGRESS_MIN_IMAGES or not sys.stderr.isatty()
    progress = tqdm(total=len(paths), unit="image", file=sys.stderr, disable=quiet)
    with progress:
        predictions = detector.predict_many(paths, args.threshold, args.max_detections, args.batch_size)
        for prediction in predictions:
            progress.update()
            if prediction.error is not None:
                failed += 1
                tqdm.write(f"lwdetr: skipped {prediction.error}", file=sys.stderr)
                continue
            records.extend(_coco_records(prediction.index, str(paths[prediction.index]), prediction))
            if args.save_annotated:
                target = _annotated_path(Path(args.save_annotated), paths[prediction.index], annotated_names)
                try:
                    _save_image(draw_detections(prediction.image, prediction.detections), target)
                except (OSError, ValueError) as error:
                    failed += 1
                    tqdm.write(f"lwdetr: could not write {target}: {error}", file=sys.stderr)
    return records, failed


def _coco_records(image_id: int, file_name: str, prediction: Prediction) -> list[dict]:
    """The prediction's COCO records (`lwdetr.postprocess.coco_record`, as evaluation writes them) plus its file."""
    from .postprocess import coco_record

    records = (coco_record(detection, image_id, prediction.size) for detection in prediction.detections)
    return [{"image_id": image_id, "file_name": file_name, **record} for record in records]


def _annotated_path(folder: Path, source: Path, used: set[str]) -> Path:
    """`folder/<name>`; a second image with the same file name gets a numbered name instead of overwriting."""
    name, counter = source.name, 1
    while name.lower() in used:
        name, counter = f"{source.stem}_{counter}{source.suffix}", counter + 1
    used.add(name.lower())
    return folder / name


def _save_image(image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    extra = {"quality": 90} if target.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    image.save(target, **extra)


def _write_results(records: list[dict], output: str | None) -> None:
    """One record per line: valid JSON that still diffs and greps well."""
    text = "[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n" if records else "[]\n"
    if output is None:
        sys.stdout.write(text)
        return
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Through a temporary file and a rename: an interrupted run never leaves a half-written results file.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert_checkpoint

    def log(message: str) -> None:
        print(f"lwdetr: {message}", file=sys.stderr)

    try:
        convert_checkpoint(args.checkpoint, args.size, args.output, num_labels=args.num_labels, log=log)
    except (ConversionError, OSError) as error:
        _error(str(error).splitlines()[0] if str(error) else type(error).__name__)
        return _EXIT_FATAL
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch, fixed image size)",
        description="Export a model folder or hub id to ONNX: input pixel_values [batch, 3, H, W] (normalised),\n"
        "outputs logits [batch, queries, classes] and pred_boxes [batch, queries, 4] (cxcywh in [0, 1]).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--model", required=True, help="model folder or hub id")
    export.add_argument("--output", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
    export.add_argument(
        "--image-size", type=_positive_int, nargs=2, default=(640, 640), metavar=("H", "W"),
        help="input height and width baked into the graph (default: 640 640)",
    )  # fmt: skip
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (16 or newer; default: 17)")
    export.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .onnx_export import OnnxMissingError, export_onnx, require_onnx

    try:
        require_onnx()  # before loading the model: say what to install without making the user wait
        from .modeling import LwDetrForObjectDetection

        model = LwDetrForObjectDetection.from_pretrained(args.model)
        path = export_onnx(model, args.output, image_size=tuple(args.image_size), opset=args.opset)
    except (ValueError, OSError, OnnxMissingError) as error:
        _error(str(error).splitlines()[0] if str(error) else type(error).__name__)
        return _EXIT_FATAL
    print(f"lwdetr: wrote {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: `sys.argv[1:]`), run the subcommand and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
