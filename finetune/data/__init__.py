"""Find, load and validate a detection dataset; hand back clean splits and a report of what was fixed.

`load_detection_data(data, val_data)` accepts:

- a Roboflow-style export folder: `train/`, `valid/` (or `val/`, `validation/`), optional `test/`, each holding
  images and `_annotations.coco.json` (or that folder's only `.json`);
- plain COCO: an annotation `.json` file, or a folder holding exactly one `.json` plus the images;
- a `.zip` of either (extracted by `finetune.archive.safe_extract_zip`);
- a Hugging Face `datasets` dataset in the object-detection layout (a `save_to_disk` folder, a hub id, or a
  `Dataset`/`DatasetDict` object); `finetune.hf_datasets` converts it to a Roboflow-style export on disk first, so
  every source goes through the same checks below.

Image files are looked up, for a `file_name` in a json, as (first hit wins): `file_name` relative to the json's
folder, then under an `images/` folder beside the json, then the bare basename beside the json, then the basename
under `images/`. Backslashes in `file_name` are read as folder separators. Every image must resolve inside the
json's folder, symlinks included (`finetune.safe_paths`): an absolute name, a `../` climbing out or a symlink
leading out is reported as "outside the dataset" and skipped, and nothing outside is ever opened.

Images are decoded as inference decodes them (`finetune.pixels`: EXIF orientation applied, 16-bit scaled,
transparency on white, inference's pixel limit), once at loading, so an image that would fail in training is
reported here. The real (upright) image size wins over the json's `width`/`height`; boxes are in the upright frame,
except those of an image whose json size is its stored, unrotated size, which are turned upright with the pixels.
Ids may be ints, integral floats or decimal strings (`finetune.coco_json.normalise_id`); the annotation file is
size-bounded and read defensively.

Category ids may be anything: the categories of all splits are merged by id (a name conflict is an error),
categories without a single annotation anywhere are dropped (Roboflow's super-category), and the rest become
contiguous label ids 0..K-1 in the order of their original ids.

Problems are fixed where that is safe and always reported (`DetectionData.report`): missing or unreadable images
are skipped, boxes with width or height <= 0 and annotations pointing to unknown images or categories are
dropped, boxes past the image edge are clipped, crowd boxes are kept for evaluation only, images without boxes
stay as negatives. Only a dataset with no training image holding a box is an error (`DataError`).

Modules: `sources` (the forms above and where their annotation files are), `coco` (one annotation file, checked),
`records` (`DetectionRecord`, `DetectionSplit`), `report` (`ValidationReport`), `loading` (`load_detection_data`:
the splits merged, labelled and held out). Import the names below from `finetune.data`.
"""

from finetune.data.loading import DetectionData, load_detection_data
from finetune.data.records import DetectionRecord, DetectionSplit, train_targets
from finetune.data.report import SplitProblems, SplitReport, ValidationReport
from finetune.errors import DataError

__all__ = [
    "DataError",
    "DetectionData",
    "DetectionRecord",
    "DetectionSplit",
    "SplitProblems",
    "SplitReport",
    "ValidationReport",
    "load_detection_data",
    "train_targets",
]
