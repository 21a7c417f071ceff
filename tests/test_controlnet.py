"""ControlNet: our Flax port against diffusers' ``ControlNetModel``, generation against diffusers'
``StableDiffusionControlNetPipeline`` run with the InstaFlow Euler loop, compilation, errors, the
CLI, and the canny helper against OpenCV.

The ControlNets are tiny random ``diffusers.ControlNetModel.from_unet`` copies of the tiny
pipeline's UNet (every parameter perturbed, so the zero convolutions are not zero), saved with
``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.monitoring
import numpy as np
import pytest
import torch
from PIL import Image

import instaflow_jax
from instaflow_jax.cli import generate as generate_cli
from instaflow_jax.conventions import nchw_to_nhwc
from instaflow_jax.models import ConfigError
from instaflow_jax.weights import WeightsMismatchError

from conftest import assert_close, perturb_torch_

PROMPTS = ["a small red circle at the top left", "a photo of a cat"]
SIZE = 64


class InstaFlowEulerScheduler:
    """InstaFlow's N-step Euler loop (docs/method.md §1) behind the scheduler calls that diffusers
    pipelines make: timesteps 1000·(1 − i/N) (floats), ``z ← z + v/N``."""

    order = 1
    init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_steps = num_inference_steps
        self.timesteps = torch.tensor(
            [1000.0 * (1.0 - i / num_inference_steps) for i in range(num_inference_steps)]
        )

    def scale_model_input(self, sample, timestep=None):
        return sample

    def step(self, model_output, timestep, sample, return_dict=False):
        return (sample + model_output / self.num_steps,)


@pytest.fixture(scope="module")
def torch_pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_pipeline_dir, torch_pipe, tmp_path_factory):
    """Three tiny ControlNets: "a" (RGB), "b" (BGR channel order), "pooled" (BGR, global pooling)."""
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("controlnets")
    dirs = {}
    for seed, (name, order, pooled) in enumerate(
        (("a", "rgb", False), ("b", "bgr", False), ("pooled", "bgr", True))
    ):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(
            torch_pipe.unet,
            conditioning_embedding_out_channels=(8, 8, 16, 16),
            controlnet_conditioning_channel_order=order,
        )
        net.register_to_config(global_pool_conditions=pooled)  # from_unet does not take it
        perturb_torch_(net, seed=10 + seed)
        net.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return instaflow_jax.load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def nets(controlnet_dirs):
    return {name: instaflow_jax.load_controlnet(path) for name, path in controlnet_dirs.items()}


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32)


def _images(seed: int, batch: int | None = None) -> np.ndarray:
    shape = (SIZE, SIZE, 3) if batch is None else (batch, SIZE, SIZE, 3)
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_residuals_match_diffusers_controlnet(controlnet_dirs, nets):
    name = "a"
    from diffusers import ControlNetModel

    reference = ControlNetModel.from_pretrained(controlnet_dirs[name]).eval()
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    condition = rng.uniform(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    t = np.array([1000.0, 437.5], np.float32)  # the InstaFlow float timesteps
    with torch.no_grad():
        down, mid = reference(
            torch.from_numpy(z),
            torch.from_numpy(t),
            torch.from_numpy(context),
            torch.from_numpy(condition),
            conditioning_scale=0.7,
            return_dict=False,
        )
    net = nets[name]
    ours_down, ours_mid = jax.jit(net.module.apply)(
        {"params": net.params}, nchw_to_nhwc(z), t, context, nchw_to_nhwc(condition), 0.7
    )
    assert len(ours_down) == len(down) == net.config.num_down_residuals
    for i, (ours, ref) in enumerate(zip(ours_down, down)):
        assert_close(ours, nchw_to_nhwc(ref.numpy()), 1e-4, f"{name} down residual {i}")
    assert_close(ours_mid, nchw_to_nhwc(mid.numpy()), 1e-4, f"{name} mid residual")


def _reference_images(torch_pipe, controlnet_dirs, names, images, scales, noise, steps, guidance, negative):
    """diffusers' StableDiffusionControlNetPipeline on the same modules, InstaFlow's Euler loop."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnets = [ControlNetModel.from_pretrained(controlnet_dirs[n]).eval() for n in names]
    reference = StableDiffusionControlNetPipeline(
        torch_pipe.vae,
        torch_pipe.text_encoder,
        torch_pipe.tokenizer,
        torch_pipe.unet,
        controlnets if len(names) > 1 else controlnets[0],
        InstaFlowEulerScheduler(),
        None,
        None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return reference(
            PROMPTS,
            image=images if len(names) > 1 else images[0],
            num_inference_steps=steps,
            guidance_scale=guidance,
            negative_prompt=[negative] * len(PROMPTS) if guidance > 1 else None,
            latents=torch.from_numpy(noise),
            height=SIZE,
            width=SIZE,
            output_type="np",
            controlnet_conditioning_scale=scales if len(names) > 1 else scales[0],
        ).images


CASES = {  # (nets, steps, guidance, negative prompt); each compiles one program
    "one-step": (["a"], 1, 0.0, ""),
    "two-controlnets-two-steps-cfg": (["a", "b"], 2, 1.5, "blue"),  # b: BGR channel order
    "pooled-one-step-cfg": (["pooled"], 1, 2.0, ""),  # global pooling, conditional half only
}


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_diffusers_controlnet_pipeline(pipe, nets, torch_pipe, controlnet_dirs, noise, case):
    names, steps, guidance, negative = CASES[case]
    scales = [0.7, 1.3][: len(names)]
    if len(names) == 1:  # one uint8 image for both prompts (diffusers gets it as a PIL image)
        ours_images, ref_images = [_images(1)], [Image.fromarray(_images(1))]
    else:  # one float image per prompt for each net
        ours_images = [_images(1 + i, batch=2).astype(np.float32) / 255.0 for i in range(len(names))]
        ref_images = ours_images
    reference = _reference_images(
        torch_pipe, controlnet_dirs, names, ref_images, scales, noise, steps, guidance, negative
    )
    kwargs = dict(
        num_steps=steps,
        guidance_scale=guidance,
        negative_prompt=negative,
        latents=noise,
        height=SIZE,
        width=SIZE,
        controlnet=[nets[n] for n in names] if len(names) > 1 else nets[names[0]],
        control_image=ours_images if len(names) > 1 else ours_images[0],
    )
    ours = pipe.generate(PROMPTS, controlnet_scale=scales if len(names) > 1 else scales[0], **kwargs)
    unconditioned = pipe.generate(PROMPTS, controlnet_scale=0.0, **kwargs)  # the same program
    assert ours.shape == reference.shape == (2, SIZE, SIZE, 3)
    assert np.abs(unconditioned - reference).max() > 1e-2, "the ControlNets must change the images"
    assert np.abs(ours - reference).max() <= 1e-4, f"max abs error {np.abs(ours - reference).max():.3g}"


def test_new_control_image_and_scale_do_not_recompile(pipe, nets, noise):
    kwargs = dict(latents=noise, height=SIZE, width=SIZE, controlnet=nets["a"])
    first = pipe.generate(PROMPTS, control_image=_images(1), controlnet_scale=0.7, **kwargs)  # may compile
    events = []
    listener = lambda name, *args, **kw: events.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = pipe.generate(PROMPTS, control_image=_images(5, batch=2), controlnet_scale=1.2, **kwargs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    compiles = [e for e in events if "compile" in e or "trace" in e]
    assert compiles == [] and pipe.last_timings.compile_s == 0.0, compiles
    assert np.abs(second - first).max() > 1e-3


def test_zero_scale_is_plain_generation(pipe, nets, noise):
    kwargs = dict(latents=noise, height=SIZE, width=SIZE)
    plain = pipe.generate(PROMPTS, **kwargs)
    zero = pipe.generate(
        PROMPTS, controlnet=nets["a"], control_image=_images(1), controlnet_scale=0.0, **kwargs
    )
    np.testing.assert_allclose(zero, plain, atol=1e-6)


def test_bad_control_arguments(pipe, nets):
    kwargs = dict(height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"control_image is 32×32 \(H×W\) but the images are 64×64"):
        pipe.generate(PROMPTS, controlnet=nets["a"], control_image=_images(1)[:32, :32], **kwargs)
    with pytest.raises(ValueError, match="holds 3 images for 2 prompts"):
        pipe.generate(PROMPTS, controlnet=nets["a"], control_image=_images(1, batch=3), **kwargs)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        pipe.generate(PROMPTS, controlnet=nets["a"], control_image=_images(1).astype(np.float32), **kwargs)
    with pytest.raises(ValueError, match="2 ControlNets need a list of 2 control images"):
        pipe.generate(PROMPTS, controlnet=[nets["a"], nets["b"]], control_image=_images(1), **kwargs)
    with pytest.raises(ValueError, match="3 controlnet_scale values for 2"):
        pipe.generate(
            PROMPTS,
            controlnet=[nets["a"], nets["b"]],
            control_image=[_images(1), _images(2)],
            controlnet_scale=[1, 2, 3],
            **kwargs,
        )
    with pytest.raises(ValueError, match="without a controlnet"):
        pipe.generate(PROMPTS, control_image=_images(1), **kwargs)


def test_load_controlnet_errors(tiny_pipeline_dir, controlnet_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ControlNet folder"):
        instaflow_jax.load_controlnet(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="expected a config of class ControlNetModel"):
        instaflow_jax.load_controlnet(os.path.join(tiny_pipeline_dir, "unet"))
    sdxl = shutil.copytree(controlnet_dirs["a"], tmp_path / "sdxl")
    config = json.loads((sdxl / "config.json").read_text())
    (sdxl / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(ConfigError, match="SDXL"):
        instaflow_jax.load_controlnet(str(sdxl))
    wide = shutil.copytree(controlnet_dirs["a"], tmp_path / "wide")
    (wide / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))
    with pytest.raises(WeightsMismatchError, match="mis-shaped"):
        instaflow_jax.load_controlnet(str(wide))


def test_generate_cli_with_a_canny_controlnet(tiny_pipeline_dir, controlnet_dirs, pipe, nets, tmp_path):
    """The README's ControlNet command: the output takes the control image's size, --canny turns it
    into edges, and the images equal the library's."""
    photo = tmp_path / "photo.png"
    Image.fromarray(_images(9)).save(photo)
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a cat", "--num-images", "2", "--controlnet"]
    argv += [controlnet_dirs["a"], "--control-image", str(photo), "--canny", "--controlnet-scale", "0.5"]
    argv += ["--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each")]
    assert generate_cli.main(argv) == 0
    edges = instaflow_jax.canny(_images(9))
    expected = pipe.generate(
        ["a cat"] * 2,
        height=SIZE,
        width=SIZE,
        controlnet=nets["a"],
        control_image=edges,
        controlnet_scale=0.5,
    )
    saved = np.asarray(Image.open(tmp_path / "each" / "0001.png"), np.float32) / 255.0
    np.testing.assert_allclose(saved, expected[1], atol=1 / 255 + 1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--controlnet", "X"], "1 --controlnet and 0 --control-image"),
        (["--canny"], "need --controlnet"),
        (["--controlnet", "/no/cn", "--control-image", "/no/img.png"], "no such file"),
    ],
)
def test_generate_cli_bad_controlnet_arguments(tiny_pipeline_dir, capsys, extra, message):
    argv = ["--model", tiny_pipeline_dir, "--prompt", "x", "--height", "64", "--width", "64"] + extra
    assert generate_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


# ------------------------------------------------------------------------------------ canny


def _smooth_image(seed: int, height: int, width: int, channels: int) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 8, width // 8, channels))
    image = ndimage.zoom(coarse, (8, 8, 1), order=3) + rng.normal(0, 8, (height, width, channels))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("low, high", [(100, 200), (50, 120), (20, 300)])
def test_canny_equals_opencv(low, high):
    import cv2

    for seed in range(4):
        rgb = _smooth_image(seed, 96, 128, 3)
        edges = instaflow_jax.canny(rgb, low, high)
        reference = cv2.Canny(rgb, low, high)
        assert edges.shape == (96, 128, 3) and edges.dtype == np.uint8
        assert reference.any()
        np.testing.assert_array_equal(edges[..., 0], reference)
        np.testing.assert_array_equal(edges[..., 2], reference)
    gray = _smooth_image(7, 64, 64, 1)[..., 0]
    np.testing.assert_array_equal(instaflow_jax.canny(gray, low, high)[..., 0], cv2.Canny(gray, low, high))
    as_float = rgb.astype(np.float32) / 255.0  # float images in [0, 1] are rounded to uint8
    np.testing.assert_array_equal(instaflow_jax.canny(as_float, low, high)[..., 0], cv2.Canny(rgb, low, high))


def test_canny_of_a_square_is_its_outline():
    image = np.zeros((32, 32), np.uint8)
    image[8:24, 8:24] = 255
    edges = instaflow_jax.canny(image)[..., 0] > 0
    rows, cols = np.nonzero(edges)
    assert edges.any() and not instaflow_jax.canny(np.full((16, 16), 90, np.uint8)).any()
    # Every edge pixel sits on the square's boundary (one pixel either side), all four sides found.
    on_boundary = (np.minimum(np.abs(rows - 7.5), np.abs(rows - 23.5)) <= 1) & (cols >= 6) & (cols <= 25)
    on_boundary |= (np.minimum(np.abs(cols - 7.5), np.abs(cols - 23.5)) <= 1) & (rows >= 6) & (rows <= 25)
    assert on_boundary.all()
    assert {r for r in rows if r < 12} and {r for r in rows if r > 20}
    assert {c for c in cols if c < 12} and {c for c in cols if c > 20}
