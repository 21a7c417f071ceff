"""The web page: a Gradio Blocks app on a ``DemoEngine`` (generate, side by side, interpolate).

Every request goes through Gradio's queue, one at a time (``concurrency_id="device"``), and only
asks for programs the engine compiled at start-up. Bad input is answered by a message in the page.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from functools import partial
from typing import Any

import jax
import numpy as np

from instaflow_jax.demo.engine import (
    GUIDANCE_RANGE,
    MAX_SEED,
    DemoEngine,
    DemoInputError,
    DemoModel,
    size_label,
)
from instaflow_jax.image_io import make_grid, to_uint8

DEVICE_QUEUE = "device"  # every generation event shares this concurrency group, limit 1
MAX_FRAMES = 16


def frame_strip(frames: np.ndarray) -> np.ndarray:
    """Frames [F, H, W, 3] → one row [H, F·(W+2)−2, 3] float32 with white gaps (the page's strip)."""
    return make_grid(frames, columns=len(frames))


def _error(message: str) -> str:
    return f"⚠️ **Error:** {message}"


def _describe(model: DemoModel) -> str:
    steps = "/".join(map(str, model.steps))
    kind = "one step" if model.steps == (1,) else f"{steps} Euler steps"
    guidance = f", guidance {model.guidance:g}" if model.uses_guidance else ""
    return f"**{model.name}** ({kind}{guidance})"


@dataclasses.dataclass
class SamplingControls:
    """The model choice and the controls that depend on it (hidden where the model has no use)."""

    model: Any
    steps: Any
    guidance: Any
    negative: Any
    size: Any


def _model_updates(engine: DemoEngine, name: str) -> tuple[dict, dict, dict]:
    """Steps, guidance and negative prompt for ``name``: shown only where the model uses them."""
    import gradio as gr

    model = engine.models[name]
    top = max(GUIDANCE_RANGE[1], model.guidance or 0.0)
    return (
        gr.update(choices=list(model.steps), value=model.steps[0], visible=model.uses_steps),
        gr.update(value=model.guidance or GUIDANCE_RANGE[0], maximum=top, visible=model.uses_guidance),
        gr.update(visible=model.uses_guidance),
    )


def _sampling_controls(engine: DemoEngine, prefix: str, names: list[str]) -> SamplingControls:
    import gradio as gr

    first = engine.models[names[0]]
    sizes = [size_label(s) for s in engine.sizes]
    model = gr.Radio(names, value=names[0], label="model", visible=len(names) > 1, elem_id=f"{prefix}-model")
    with gr.Row():
        steps = gr.Radio(
            list(first.steps),
            value=first.steps[0],
            label="steps",
            visible=first.uses_steps,
            elem_id=f"{prefix}-steps",
        )
        size = gr.Dropdown(
            sizes, value=sizes[0], label="size (compiled at start-up)", elem_id=f"{prefix}-size"
        )
    guidance = gr.Slider(
        GUIDANCE_RANGE[0],
        max(GUIDANCE_RANGE[1], first.guidance or 0.0),
        value=first.guidance or GUIDANCE_RANGE[0],
        step=0.1,
        label="guidance (1 = off)",
        visible=first.uses_guidance,
        elem_id=f"{prefix}-guidance",
    )
    negative = gr.Textbox(
        label="negative prompt", visible=first.uses_guidance, max_lines=1, elem_id=f"{prefix}-negative"
    )
    model.change(partial(_model_updates, engine), model, [steps, guidance, negative], queue=False)
    return SamplingControls(model, steps, guidance, negative, size)


def _generate_tab(engine: DemoEngine, live_delay_s: float) -> None:
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="prompt",
                placeholder="a photo of an astronaut riding a horse — Enter to generate",
                max_lines=1,
                elem_id="prompt",
            )
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                live = gr.Checkbox(label="live: regenerate as you type", elem_id="live")
            with gr.Row():
                seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
                randomise = gr.Button("randomise seed", elem_id="randomise")
            count = gr.Slider(
                1,
                max(engine.max_images, 2),  # Gradio needs min < max; hidden when only 1 is offered
                value=1,
                step=1,
                label="images",
                visible=engine.max_images > 1,
                elem_id="count",
            )
            controls = _sampling_controls(engine, "gen", engine.names)
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="images",
                columns=2,
                fit_columns=False,  # two columns even for one image, so a square image fits the height
                object_fit="contain",
                format="png",
                elem_id="gallery",
                height="auto",
            )
            status = gr.Markdown(elem_id="status")
    live_state = gr.State(None)
    timer = gr.Timer(0.2, active=False)
    inputs = [controls.model, prompt, seed, count, controls.steps, controls.guidance, controls.negative]
    inputs.append(controls.size)

    def run(*values: Any) -> tuple[Any, str, dict]:
        key = tuple(values)
        try:
            images, text = engine.generate(*values)
            shown: Any = [to_uint8(image) for image in images]
        except DemoInputError as err:
            shown, text = [], _error(str(err))
        return shown, text, {"key": key, "since": time.monotonic(), "done": key}

    def tick(state: dict | None, *values: Any) -> tuple[Any, Any, dict]:
        """Live mode: generate once the request has stayed unchanged for ``live_delay_s``."""
        key, now = tuple(values), time.monotonic()
        if state is None or state["key"] != key:
            return gr.skip(), gr.skip(), {"key": key, "since": now, "done": (state or {}).get("done")}
        if state["done"] == key or now - state["since"] < live_delay_s or not str(values[1]).strip():
            return gr.skip(), gr.skip(), state
        return run(*values)

    common = dict(concurrency_id=DEVICE_QUEUE, concurrency_limit=1)
    gr.on([prompt.submit, button.click], run, inputs, [gallery, status, live_state], **common)
    randomise.click(lambda: random.randint(0, MAX_SEED), None, seed, queue=False).then(
        run, inputs, [gallery, status, live_state], **common
    )
    live.change(lambda on: gr.Timer(active=on), live, timer, queue=False)
    timer.tick(tick, [live_state, *inputs], [gallery, status, live_state], show_progress="hidden", **common)


def _compare_tab(engine: DemoEngine) -> None:
    import gradio as gr

    first, second = engine.models.values()
    gr.Markdown(f"The same prompt and seed (the same noise): {_describe(first)} vs {_describe(second)}.")
    with gr.Row():
        prompt = gr.Textbox(label="prompt", max_lines=1, scale=3, elem_id="cmp-prompt")
        seed = gr.Number(0, precision=0, minimum=0, label="seed", scale=1, elem_id="cmp-seed")
    controls = _sampling_controls(engine, "cmp", [second.name])
    button = gr.Button("Compare", variant="primary", elem_id="compare")
    with gr.Row():
        with gr.Column():
            left = gr.Image(label=f"{first.name}, {first.steps[0]} step(s)", format="png", elem_id="cmp-left")
            left_text = gr.Markdown(elem_id="cmp-left-timing")
        with gr.Column():
            right = gr.Image(label=second.name, format="png", elem_id="cmp-right")
            right_text = gr.Markdown(elem_id="cmp-right-timing")

    def run(prompt: str, seed: Any, steps: Any, guidance: Any, negative: str, size: str) -> tuple:
        try:
            (a, a_text), (b, b_text) = engine.compare(prompt, seed, steps, guidance, negative, size)
        except DemoInputError as err:
            return None, _error(str(err)), None, ""
        return to_uint8(a), a_text, to_uint8(b), b_text

    inputs = [prompt, seed, controls.steps, controls.guidance, controls.negative, controls.size]
    outputs = [left, left_text, right, right_text]
    gr.on(
        [prompt.submit, button.click], run, inputs, outputs, concurrency_id=DEVICE_QUEUE, concurrency_limit=1
    )


def _interpolate_tab(engine: DemoEngine) -> None:
    import gradio as gr

    gr.Markdown("A walk between the noises of two seeds (spherical interpolation), one prompt.")
    prompt = gr.Textbox(label="prompt", max_lines=1, elem_id="int-prompt")
    with gr.Row():
        seed_a = gr.Number(0, precision=0, minimum=0, label="seed A", elem_id="int-seed-a")
        seed_b = gr.Number(1, precision=0, minimum=0, label="seed B", elem_id="int-seed-b")
        frames = gr.Slider(2, MAX_FRAMES, value=8, step=1, label="frames", elem_id="int-frames")
    controls = _sampling_controls(engine, "int", engine.names)
    button = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
    strip = gr.Image(label="frames", format="png", elem_id="int-strip")
    with gr.Row():
        gif = gr.Image(label="animation (GIF)", type="filepath", elem_id="int-gif")
        status = gr.Markdown(elem_id="int-status")

    def run(name: str, prompt: str, a: Any, b: Any, n: Any, steps: Any, g: Any, neg: str, size: str) -> tuple:
        try:
            walk, gif_path, text = engine.interpolate(name, prompt, a, b, n, steps, g, neg, size)
        except DemoInputError as err:
            return None, None, _error(str(err))
        return to_uint8(frame_strip(walk)), gif_path, text

    c = controls
    inputs = [c.model, prompt, seed_a, seed_b, frames, c.steps, c.guidance, c.negative, c.size]
    outputs = [strip, gif, status]
    gr.on(
        [prompt.submit, button.click], run, inputs, outputs, concurrency_id=DEVICE_QUEUE, concurrency_limit=1
    )


def build_demo(engine: DemoEngine, live_delay_s: float = 0.4, title: str = "InstaFlow") -> Any:
    """The page for ``engine`` as a ``gradio.Blocks`` with its queue set up; call ``.launch()``.

    Call ``engine.warm_up()`` first so that no request waits for a compile. Gradio's usage
    analytics and version check are turned off: the page and the server reach no other host
    (``launch(share=True)`` opens a public tunnel, only when asked).
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read again at launch
    import gradio as gr

    device = jax.devices()[0]
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        models = ", ".join(_describe(model) for model in engine.models.values()) or "none"
        gr.Markdown(
            f"# {title}: one-step text-to-image\nModels: {models} · devices: {jax.local_device_count()} × "
            f"{device.device_kind}",
            elem_id="header",
        )
        for message in engine.errors:
            gr.Markdown(_error(message), elem_id="load-error")
        if not engine.models:
            gr.Markdown("Nothing to generate with: fix the model path and start the demo again.")
        else:
            with gr.Tabs():
                with gr.Tab("Generate", id="generate"):
                    _generate_tab(engine, live_delay_s)
                if len(engine.models) > 1:
                    with gr.Tab("Side by side", id="compare"):
                        _compare_tab(engine)
                with gr.Tab("Interpolate", id="interpolate"):
                    _interpolate_tab(engine)
    demo.queue(default_concurrency_limit=1)
    return demo
