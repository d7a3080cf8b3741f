"""The Gradio app's helpers: settings and data folder, model registry, detection, dataset preview, training job
(a child process), runs and their owners, UI.

`app.py` is the entry point; `lwdetr/` and `finetune/` never import this package (nor gradio). Only `ui` and
`handlers` import gradio, so the other modules are plain Python and tested as such.
"""
