"""The Gradio page of ``varlib-app``: Generate (gallery and scale strip), Edit and Model tabs over an
:class:`varlib.app.service.AppService`.

API endpoints (``gradio_client``): ``/generate``, ``/scale_strip``, ``/edit`` and ``/model_card``; for a
text-conditional model ``/generate`` and ``/scale_strip`` take prompts and a negative prompt where a class model's
take classes, and ``/edit`` takes a prompt for its target. Bad input raises
``gr.Error`` with the service's message, which the page shows while the app keeps serving; a full queue is
answered by Gradio ("Queue is full"). Nothing is fetched from the network: analytics are off and the theme uses
the system's fonts.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read by gradio on import: no usage reports

import gradio as gr  # noqa: E402  (after the setting above)

from varlib.app.service import AppService, open_upload  # noqa: E402

# Images are a few dozen pixels wide: show their pixels instead of a blur.
CSS = ".pixelated img, .pixelated canvas { image-rendering: pixelated; }"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
EDIT_MODE_CHOICES = [
    ("in-painting: regenerate the drawn region", "inpaint"),
    ("out-painting: keep the drawn region, regenerate the rest", "outpaint"),
    ("class-conditional: regenerate the drawn region as the target class", "class"),
]
# A text model conditions every mode on the prompt (its "class" mode is in-painting).
TEXT_EDIT_MODE_CHOICES = [
    ("in-painting: regenerate the drawn region as the prompt", "inpaint"),
    ("out-painting: keep the drawn region, regenerate the rest as the prompt", "outpaint"),
]
EXAMPLE_PROMPT = "red heart"  # a caption of the emoji that the demo's text model trained on


def user_errors(fn: Callable) -> Callable:
    """``fn`` with its ValueErrors (bad input) shown in the page as ``gr.Error``."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def checked_editor_value(editor: gr.ImageEditor, payload: Any, max_pixels: int) -> dict | None:
    """The editor's value (background, layers, composite as PIL images) from its unprocessed payload (the event runs
    with ``preprocess=False``), after refusing an upload whose header says it has more than ``max_pixels`` pixels:
    Gradio's own preprocessing decodes every layer in full, so a check after it would come too late."""
    if not payload:
        return None
    data = editor.data_model.model_validate(payload)
    stored = editor.blob_storage.get(data.id) if data.id is not None else None
    files = stored if stored is not None else data
    for upload in [files.background, *(files.layers or []), files.composite]:
        if upload is not None:
            open_upload(io.BytesIO(upload) if isinstance(upload, bytes) else upload.path, max_pixels).close()
    return editor.preprocess(data)


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts (the default theme loads web fonts)."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])


def build_app(service: AppService, examples: Sequence[Path] = ()) -> gr.Blocks:
    """The page; queue and launch it with :func:`launch`."""
    var = service.var
    conditioned_on = "text-conditional (prompts)" if service.text else f"{var.num_classes} classes"
    with gr.Blocks(title="varlib", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"## varlib: VAR, next-scale prediction\n{conditioned_on}, "
                    f"{service.resolution}x{service.resolution} px, scales {', '.join(map(str, var.patch_nums))}")
        with gr.Tab("Generate"):
            generate_tab(service)
        with gr.Tab("Edit"):
            edit_tab(service, examples)
        with gr.Tab("Model"):
            card = gr.Markdown(elem_id="model-card")
            app.load(service.model_card, None, card, api_name="model_card")
    return app


def sampling_controls(service: AppService) -> list[gr.components.Component]:
    """The sampling settings' controls: guidance, top-k, top-p (the model's defaults) and the seed."""
    defaults = service.default_settings()
    return [gr.Slider(0, 10, value=defaults.cfg, step=0.1, label="Guidance (cfg)"),
            gr.Slider(0, service.var.vocab_size, value=defaults.top_k, step=1, label="top-k (0 = off)"),
            gr.Slider(0, 1, value=defaults.top_p, step=0.01, label="top-p (0 = off)"),
            gr.Number(value=0, precision=0, minimum=0, label="Seed")]


def condition_inputs(service: AppService) -> list[gr.components.Component]:
    """What the samples are conditioned on: prompts and a negative prompt, or classes."""
    if service.text:
        prompts = gr.Textbox(EXAMPLE_PROMPT, lines=3, label="Prompts, one per line", elem_id="prompts")
        negative = gr.Textbox("", label="Negative prompt (guidance steers away from it; empty: none)",
                              elem_id="negative")
        return [prompts, negative]
    names = service.class_names
    return [gr.Dropdown(names, value=[names[0]], multiselect=True, label="Classes", elem_id="classes")]


def generate_tab(service: AppService) -> None:
    """The Generate tab: samples of classes or prompts, and one sample's image after each scale (the strip)."""

    @user_errors
    def generate(classes, count, cfg, top_k, top_p, seed):
        return service.generate(classes, count, cfg, top_k, top_p, seed)

    @user_errors
    def generate_from_prompts(prompts, negative, count, cfg, top_k, top_p, seed):
        return service.generate(prompts, count, cfg, top_k, top_p, seed, negative)

    @user_errors
    def scale_strip(class_name, cfg, top_k, top_p, seed):
        return service.scale_strip(class_name, cfg, top_k, top_p, seed)

    @user_errors
    def scale_strip_of_prompt(prompt, negative, cfg, top_k, top_p, seed):
        return service.scale_strip(prompt, cfg, top_k, top_p, seed, negative)

    with gr.Row():
        conditions = condition_inputs(service)
        count = gr.Slider(1, service.max_images, value=min(4, service.max_images), step=1,
                          label="Images per prompt" if service.text else "Images per class", elem_id="count")
    with gr.Row():
        settings = sampling_controls(service)
    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
    gallery = gr.Gallery(label="Samples", columns=8, height="auto", format="png", elem_id="gallery",
                         elem_classes="pixelated")
    with gr.Row():
        if service.text:
            strip_condition = gr.Textbox(EXAMPLE_PROMPT, label="Scale strip: prompt", elem_id="strip-prompt")
        else:
            strip_condition = gr.Dropdown(service.class_names, value=service.class_names[0],
                                          label="Scale strip: class", elem_id="strip-class")
        strip_button = gr.Button("Show the scales", elem_id="strip-button")
    strip = gr.Gallery(label="One image after each scale, coarse to fine", columns=len(service.var.patch_nums),
                       height="auto", format="png", elem_id="scale-strip", elem_classes="pixelated")
    # up to batch_size requests wait on the model thread at once (one call can take them all); the rest
    # wait in the bounded queue
    generate_event = generate_button.click(generate_from_prompts if service.text else generate,
                                           [*conditions, count, *settings], gallery,
                                           api_name="generate", concurrency_limit=service.worker.batch_size)
    strip_fn = scale_strip_of_prompt if service.text else scale_strip
    strip_inputs = [strip_condition, *conditions[1:], *settings]  # a text model's negative
    strip_button.click(strip_fn, strip_inputs, strip, api_name="scale_strip")
    generate_event.success(strip_fn, strip_inputs, strip, api_name="scale_strip_after_generate",
                           api_visibility="private")


def edit_tab(service: AppService, examples: Sequence[Path]) -> None:
    """The Edit tab: an image with a drawn region, regenerated by mode (in-painting, ...) for a class or prompt."""

    def edit_outcome(payload, mode, target, seed):
        value = checked_editor_value(editor, payload, service.max_upload_pixels)
        if not value:
            raise ValueError("upload an image (or pick an example) to edit: got none")
        outcome = service.edit(value.get("background"), value.get("layers") or [], mode, target, seed)
        images = [(outcome.before, "before"), (outcome.region, "regenerated tokens"), (outcome.after, "after")]
        return images, f"{outcome.tokens} tokens regenerated"

    @user_errors
    def edit(editor, mode, target_class, seed):
        return edit_outcome(editor, mode, target_class, seed)

    @user_errors
    def edit_with_prompt(editor, mode, prompt, seed):
        return edit_outcome(editor, mode, prompt, seed)

    with gr.Row():
        editor = gr.ImageMask(type="pil", image_mode=None, format="png", sources=("upload", "clipboard"),
                              label="Image: draw over the region", elem_id="editor", elem_classes="pixelated",
                              brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"))
        with gr.Column():
            mode = gr.Radio(TEXT_EDIT_MODE_CHOICES if service.text else EDIT_MODE_CHOICES, value="inpaint",
                            label="Mode", elem_id="edit-mode")
            if service.text:
                target = gr.Textbox(EXAMPLE_PROMPT, label="Prompt (what the regenerated part shows)",
                                    elem_id="edit-prompt")
            else:
                target = gr.Dropdown(service.class_names, value=service.class_names[0],
                                     label="Target class (class-conditional)")
            edit_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
            edit_status = gr.Textbox(label="Status", interactive=False, elem_id="edit-status")
    if examples:
        gr.Examples([[str(path)] for path in examples], [editor], label="Examples", elem_id="examples")
    comparison = gr.Gallery(label="Before (as the model sees it), regenerated tokens (white), after", columns=3,
                            height="auto", format="png", elem_id="comparison", elem_classes="pixelated")
    # unprocessed inputs: the editor's upload is checked from its header before it is decoded
    edit_button.click(edit_with_prompt if service.text else edit, [editor, mode, target, edit_seed],
                      [comparison, edit_status], api_name="edit", preprocess=False)


def launch(app: gr.Blocks, host: str, port: int | None, queue_size: int, block: bool = True,
           allowed_paths: Sequence[Path] = ()) -> None:
    """Serves ``app`` on ``host:port`` behind a queue of at most ``queue_size`` waiting requests; returns when the
    server stops (``block``) or at once."""
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=True,
               ssr_mode=False, theme=theme(), css=CSS, allowed_paths=[str(p) for p in allowed_paths],
               footer_links=["api"])
