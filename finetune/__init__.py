"""Fine-tuning LW-DETR on your own detection data.

Modules (import them directly; this package imports nothing heavy on purpose):

- `finetune.data`: find, load and validate a dataset (Roboflow export, plain COCO, zip, Hugging Face datasets).
  Its modules: `sources` (dataset forms), `coco` (one annotation file, checked), `records`, `report`, `loading`.
- `finetune.transforms`: the torch dataset, albumentations augmentations and multi-scale batching.
- `finetune.synthetic`: a generator of simple-shape datasets for tests and demos.
- `finetune.archive`: safe zip extraction.
- `finetune.hf_datasets`: Hugging Face `datasets` object-detection datasets to the COCO layout.
- `finetune.coco_json`: reading a (possibly hostile) COCO annotation file: size limits, ids normalised.
- `finetune.safe_paths`: image paths named by a dataset, confined to the dataset's folder.
- `finetune.pixels`: decoding dataset images exactly as inference does; EXIF orientation of boxes.
- `finetune.config`: `TrainConfig` (a run's settings as plain data) and `resume_config()`.
- `finetune.train`: `train()`, the Accelerate loop, read top to bottom; `finetune.build` makes what it trains with
  (accelerator, model, datasets), `finetune.checkpoints` decides what it saves and when, `finetune.loss_log` reads
  its losses.
- `finetune.result`: `TrainResult`, what a run produced.
- `finetune.defaults`: the auto settings: a recipe per base model (pretrained, demo, from scratch) and dataset size.
- `finetune.state`: the run state on disk (save, check, recover, resume) and `finetune.faults`, crash points for tests.
- `finetune.optim`: AdamW parameter groups (layer-wise decay for the ViT) and the warmup-then-decay schedule.
- `finetune.ema`: the exponential moving average of the weights.
- `finetune.evaluate`: COCO evaluation with pycocotools.
- `finetune.export`: HF-format folders, metrics, plots and the model card of a run.
- `finetune.callbacks`: progress events for programs (the app) and the terminal's tqdm bar.
- `python -m finetune`: the command line (`--help`).
"""
