"""Fine-tuning LW-DETR on your own detection data.

Modules (import them directly; this package imports nothing heavy on purpose):

- `finetune.data`: find, load and validate a dataset (Roboflow export, plain COCO, zip, Hugging Face datasets).
- `finetune.transforms`: the torch dataset, albumentations augmentations and multi-scale batching.
- `finetune.synthetic`: a generator of simple-shape datasets for tests and demos.
- `finetune.archive`: safe zip extraction.
"""
