"""CLIP score: our Flax ``CLIPModel`` (models/clip_vision.py, weights/clip_model.py) against
transformers' ``CLIPModel``, and evaluation/clip_score.py against torchmetrics' ``CLIPScore``.

Tiny random transformers models (quick_gelu with the legacy ``eos_token_id=2`` pooling rule, gelu
with the current one) are saved with their own ``save_pretrained`` (safetensors, sharded
safetensors, ``pytorch_model.bin``) and loaded with our loader; embeddings must agree to 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from instaflow_jax.evaluation.clip_score import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_cosine,
    clip_preprocess,
    clip_score,
    torchmetrics_clip_score,
)
from instaflow_jax.models.clip_vision import CLIPModel, get_image_features, get_text_features  # noqa: E402
from instaflow_jax.models.configs import ConfigError  # noqa: E402
from instaflow_jax.text import tokenize  # noqa: E402
from instaflow_jax.weights.clip_model import (  # noqa: E402
    CLIPPreprocessConfig,
    load_clip_model,
    load_clip_tokenizer,
)
from instaflow_jax.weights.convert import WeightsMismatchError, flatten  # noqa: E402
from instaflow_jax.weights.tiny import write_tiny_tokenizer  # noqa: E402

from conftest import perturb_torch_  # noqa: E402

IMAGE, PATCH = 32, 8
CAPTIONS = ["a photo of a cat", "a red circle on the left", "an astronaut riding a horse", "blue"]
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.35)
TOL = 1e-4  # max abs error of the embeddings (they are O(1))


def _torch_features(output):
    """transformers ≥ 5 returns a ``BaseModelOutputWithPooling`` (projected ``pooler_output``)."""
    return getattr(output, "pooler_output", output)


def write_tiny_clip_model(
    folder: str, act: str, legacy_eos: bool, seed: int, safe: bool = True, shard: str | None = None
):
    vocab = write_tiny_tokenizer(folder)  # BOS = vocab - 2, EOS = vocab - 1 (the largest id) = pad
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=vocab - 2,
            eos_token_id=2 if legacy_eos else vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE,
            patch_size=PATCH,
            hidden_act=act,
        ),
        projection_dim=24,
        logit_scale_init_value=2.3,
    )
    torch.manual_seed(seed)
    model = perturb_torch_(transformers.CLIPModel(config), seed=seed)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if not safe:  # transformers ≥ 5 writes safetensors only: write what transformers 4 wrote
        os.remove(os.path.join(folder, "model.safetensors"))
        state = dict(model.state_dict())  # plus the position_ids buffers old checkpoints carry
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1)[None]
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": IMAGE},
                "crop_size": {"height": IMAGE, "width": IMAGE},
                "image_mean": list(MEAN),
                "image_std": list(STD),
                "resample": 3,
            },
            f,
        )
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name → (folder, torch model): quick_gelu/legacy EOS and gelu/current EOS in safetensors,
    the first also as ``pytorch_model.bin`` and as sharded safetensors (same weights)."""
    root = tmp_path_factory.mktemp("clip")
    out = {}
    for name, act, legacy, seed in (("quick_gelu", "quick_gelu", True, 1), ("gelu", "gelu", False, 2)):
        out[name] = (str(root / name), write_tiny_clip_model(str(root / name), act, legacy, seed))
    bin_folder = str(root / "bin")
    out["bin"] = (bin_folder, write_tiny_clip_model(bin_folder, "quick_gelu", True, 1, safe=False))
    out["sharded"] = (
        str(root / "sharded"),
        write_tiny_clip_model(str(root / "sharded"), "gelu", False, 2, shard="40KB"),
    )
    return out


@pytest.fixture(scope="module")
def inputs(folders):
    folder, _ = folders["gelu"]
    ids = tokenize(load_clip_tokenizer(folder), CAPTIONS)  # [4, 77]: BOS, words, EOS, EOS padding
    images = np.random.default_rng(0).random((len(CAPTIONS), 40, 48, 3)).astype(np.float32)
    return ids, images


@pytest.fixture(scope="module")
def loaded(folders):
    return {name: load_clip_model(folder) for name, (folder, _) in folders.items()}


_image_fn = jax.jit(get_image_features, static_argnums=0)
_text_fn = jax.jit(get_text_features, static_argnums=0)


def test_files_written_as_expected(folders):
    assert os.path.isfile(os.path.join(folders["gelu"][0], "model.safetensors"))
    assert os.path.isfile(os.path.join(folders["bin"][0], "pytorch_model.bin"))
    assert os.path.isfile(os.path.join(folders["sharded"][0], "model.safetensors.index.json"))


@pytest.mark.parametrize("name", ["quick_gelu", "gelu", "bin"])
def test_features_match_transformers(folders, loaded, inputs, name):
    _, torch_model = folders[name]
    model, params, pre = loaded[name]
    ids, images = inputs
    assert pre == CLIPPreprocessConfig(size=IMAGE, crop_size=IMAGE, image_mean=MEAN, image_std=STD)
    pixels = clip_preprocess(jnp.asarray(images), pre.size, pre.image_mean, pre.image_std, pre.crop_size)
    assert pixels.shape == (len(CAPTIONS), IMAGE, IMAGE, 3)
    with torch.no_grad():
        torch_pixels = torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2)
        ref_image = _torch_features(torch_model.get_image_features(pixel_values=torch_pixels)).numpy()
        ref_text = _torch_features(
            torch_model.get_text_features(input_ids=torch.from_numpy(ids).long())
        ).numpy()
        ref_logits = torch_model(
            input_ids=torch.from_numpy(ids).long(), pixel_values=torch_pixels
        ).logits_per_image
    ours_image = np.asarray(_image_fn(model, params, pixels))
    ours_text = np.asarray(_text_fn(model, params, jnp.asarray(ids)))
    err_image = float(np.abs(ours_image - ref_image).max())
    err_text = float(np.abs(ours_text - ref_text).max())
    print(f"{name}: max abs error image {err_image:.2e}, text {err_text:.2e}")
    assert ours_image.shape == ref_image.shape == (len(CAPTIONS), 24)
    assert err_image <= TOL and err_text <= TOL, (err_image, err_text)
    _, _, logits = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), pixels)
    np.testing.assert_allclose(np.asarray(logits), ref_logits.numpy(), atol=1e-3)


def test_sharded_safetensors_load_the_same_params(folders, loaded):
    ours = flatten(loaded["sharded"][1])
    ref = flatten(loaded["gelu"][1])
    assert set(ours) == set(ref)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_param_tree_is_transformers_layout(loaded):
    model, params, _ = loaded["gelu"]
    assert isinstance(model, CLIPModel)
    assert set(params) == {
        "text_model",
        "vision_model",
        "text_projection",
        "visual_projection",
        "logit_scale",
    }
    flat = flatten(params)
    for path in [
        ("vision_model", "embeddings", "class_embedding"),
        ("vision_model", "embeddings", "patch_embedding", "kernel"),
        ("vision_model", "embeddings", "position_embedding", "embedding"),
        ("vision_model", "pre_layrnorm", "scale"),
        ("vision_model", "encoder", "layers", "1", "self_attn", "q_proj", "kernel"),
        ("vision_model", "post_layernorm", "bias"),
        ("text_model", "final_layer_norm", "scale"),
        ("visual_projection", "kernel"),
    ]:
        assert path in flat, path
    assert flat[("vision_model", "embeddings", "patch_embedding", "kernel")].shape == (PATCH, PATCH, 3, 48)
    assert flat[("vision_model", "embeddings", "position_embedding", "embedding")].shape == (17, 48)
    assert flat[("logit_scale",)].shape == ()


def test_big_configs_build(tmp_path):
    """ViT-L/14 (openai, legacy ``*_config_dict``) and ViT-g/14 (laion) configs → param shapes."""
    from instaflow_jax.models.clip_vision import CLIPConfig
    from instaflow_jax.weights.clip_model import expected_shapes

    openai = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": {"eos_token_id": 2, "hidden_size": 512, "some_generation_key": None},
        "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        "vision_config": {"hidden_size": 1024, "patch_size": 14},
        "vision_config_dict": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
        },
    }
    cfg = CLIPConfig.from_dict(openai)
    # transformers fills *_config_dict with its defaults and lets them win (eos 49407 here): every
    # field we read must be what transformers reads from the same dict.
    reference = transformers.CLIPConfig.from_dict(openai)
    for ours, theirs in ((cfg.text, reference.text_config), (cfg.vision, reference.vision_config)):
        for field in dataclasses.fields(ours):
            assert getattr(ours, field.name) == getattr(theirs, field.name), (type(ours).__name__, field.name)
    assert cfg.projection_dim == reference.projection_dim
    assert cfg.text.eos_token_id == 49407 and cfg.vision.num_hidden_layers == 24
    laion = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 1024,
        "text_config": {
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
        },
        "vision_config": {
            "hidden_act": "gelu",
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_attention_heads": 16,
            "num_hidden_layers": 40,
            "patch_size": 14,
            "image_size": 224,
        },
    }
    shapes = expected_shapes(CLIPModel(CLIPConfig.from_dict(laion)))
    assert shapes[("vision_model", "embeddings", "position_embedding", "embedding")].shape == (257, 1408)
    assert shapes[("vision_model", "encoder", "layers", "39", "mlp", "fc1", "kernel")].shape == (1408, 6144)
    assert shapes[("visual_projection", "kernel")].shape == (1408, 1024)
    assert shapes[("text_projection", "kernel")].shape == (1024, 1024)


def test_loader_errors(tmp_path, folders):
    from safetensors.numpy import load_file, save_file

    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_clip_model(str(tmp_path / "nowhere"))
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(
        json.dumps({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"})
    )
    with pytest.raises(ConfigError, match="does not describe a transformers CLIPModel"):
        load_clip_model(str(text_only))
    (text_only / "config.json").write_text(
        json.dumps({"model_type": "clip", "text_config": {}, "vision_config": {}})
    )
    with pytest.raises(FileNotFoundError, match="no CLIP weights found"):
        load_clip_model(str(text_only))

    source = folders["gelu"][0]
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(source, "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    state.pop("vision_model.post_layernorm.weight")
    state["vision_model.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(WeightsMismatchError) as err:
        load_clip_model(str(broken))
    message = str(err.value)
    assert "vision_model/post_layernorm/scale" in message and "vision_model/extra/kernel" in message
    assert "transformers CLIPModel checkpoint" in message and "SD 1.x" not in message

    config["projection_dim"] = 20
    (broken / "config.json").write_text(json.dumps(config))
    save_file(load_file(os.path.join(source, "model.safetensors")), str(broken / "model.safetensors"))
    with pytest.raises(
        WeightsMismatchError,
        match=r"mis-shaped .*visual_projection/kernel: checkpoint \(48, 24\) vs model \(48, 20\)",
    ):
        load_clip_model(str(broken))


def test_preprocess_matches_reference_resamplers():
    """Same filter as torch's antialiased bicubic (transformers' torchvision backend) and PIL's;
    within one 8-bit level of transformers' PIL-backend ``CLIPImageProcessorPil`` on 8-bit images."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for shape, size in [((2, 64, 48, 3), 32), ((2, 20, 30, 3), 32), ((1, 40, 40, 3), 24)]:
        mid = (0.3 + 0.4 * rng.random(shape)).astype(np.float32)  # bicubic stays inside [0, 1]
        normalised = jax.jit(clip_preprocess, static_argnums=1)(jnp.asarray(mid), size)
        ours = np.asarray(normalised) * np.array(OPENAI_CLIP_STD) + np.array(OPENAI_CLIP_MEAN)
        _, h, w, _ = shape
        new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(mid).permute(0, 3, 1, 2), (new_h, new_w), mode="bicubic", antialias=True
        ).permute(0, 2, 3, 1)[:, top : top + size, left : left + size]
        assert np.abs(ours - ref.numpy()).max() < 1e-4, shape
        pil = [
            np.stack(
                [
                    np.asarray(Image.fromarray(img[..., c], mode="F").resize((new_w, new_h), Image.BICUBIC))
                    for c in range(3)
                ],
                -1,
            )[top : top + size, left : left + size]
            for img in mid
        ]
        assert np.abs(ours - np.stack(pil)).max() < 1e-4, shape

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except Exception as err:  # transformers < 5 or no PIL backend
        pytest.skip(f"CLIPImageProcessorPil unavailable: {err}")
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for shape in [(40, 50, 3), (64, 48, 3), (20, 24, 3)]:  # noise: bicubic overshoot everywhere
        img = np.round(rng.random(shape) * 255).astype(np.uint8)
        ref = proc(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = np.asarray(
            clip_preprocess(jnp.asarray(img[None] / 255.0), 32, proc.image_mean, proc.image_std)
        )[0]
        diff = np.abs(ours - ref)
        assert diff.max() < 1.01 / 255 / min(proc.image_std) and diff.mean() < 0.01, (shape, diff.max())


def test_score_conventions():
    cos = np.array([0.3, 0.25, 0.35, -0.1], np.float32)
    assert clip_score(jnp.asarray(cos)) == pytest.approx(0.2)
    assert torchmetrics_clip_score(cos) == pytest.approx(20.0)
    assert torchmetrics_clip_score([-0.2, 0.1]) == 0.0
    a = jax.random.normal(jax.random.key(0), (5, 7))
    b = jax.random.normal(jax.random.key(1), (5, 7))
    expected = (
        np.sum(np.asarray(a) * np.asarray(b), -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    )
    np.testing.assert_allclose(np.asarray(jax.jit(clip_cosine)(a, b)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        clip_score([])


class _TensorFeatures(torch.nn.Module):
    """transformers ≥ 5's ``get_*_features`` return a ``BaseModelOutputWithPooling``, which
    torchmetrics 1.9 divides as a tensor: hand it the projected embeddings, as transformers 4 did."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return _torch_features(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return _torch_features(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )


class _Processor:
    """A CLIPProcessor stand-in: images through our ``clip_preprocess``, captions through the
    folder's tokenizer (no torchvision, no download)."""

    def __init__(self, tokenizer, pre):
        self.tokenizer, self.pre = tokenizer, pre

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True):
        if images is not None:
            nhwc = jnp.asarray(torch.stack(images).permute(0, 2, 3, 1).numpy())
            pixels = clip_preprocess(nhwc, self.pre.size, self.pre.image_mean, self.pre.image_std)
            return {"pixel_values": torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2)}
        return self.tokenizer(text, return_tensors="pt", padding=padding)


@pytest.mark.parametrize("name", ["quick_gelu", "gelu"])
def test_torchmetrics_clip_score_parity(folders, loaded, inputs, name):
    """torchmetrics' own ``clip_score`` (model and processor from a callable, as it allows) vs
    ``torchmetrics_clip_score`` of our cosines, on the same images and captions."""
    try:
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update
        from torchmetrics.functional.multimodal.clip_score import clip_score as tm_clip_score
    except Exception as err:  # not installed, or a broken optional dependency (torchvision)
        pytest.skip(f"torchmetrics cannot be imported: {err!r}")
    folder, torch_model = folders[name]
    model, params, pre = loaded[name]
    ids, images = inputs
    processor = _Processor(load_clip_tokenizer(folder), pre)
    wrapped = _TensorFeatures(torch_model)
    torch_images = list(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.no_grad():
        reference = float(
            tm_clip_score(torch_images, CAPTIONS, model_name_or_path=lambda: (wrapped, processor))
        )
        per_pair, n = _clip_score_update(torch_images, CAPTIONS, wrapped, processor)

    pixels = clip_preprocess(jnp.asarray(images), pre.size, pre.image_mean, pre.image_std)
    cos = clip_cosine(_image_fn(model, params, pixels), _text_fn(model, params, jnp.asarray(ids)))
    ours = torchmetrics_clip_score(cos)
    print(f"{name}: torchmetrics {reference:.6f}, ours {ours:.6f}, paper convention {clip_score(cos):.6f}")
    assert n == len(CAPTIONS)
    np.testing.assert_allclose(100 * np.asarray(cos), per_pair.numpy(), atol=1e-3)
    assert abs(ours - reference) <= 1e-3


class _Fixed(torch.nn.Module):
    """A "model" whose features are given embeddings."""

    config = None

    def __init__(self, img, txt):
        super().__init__()
        self.img, self.txt = torch.from_numpy(img), torch.from_numpy(txt)

    def get_image_features(self, pixel_values):
        return self.img

    def get_text_features(self, input_ids, attention_mask=None):
        return self.txt


def _dummy_processor(text=None, images=None, return_tensors="pt", padding=True):
    if images is not None:
        return {"pixel_values": torch.zeros(len(images), 3, 2, 2)}
    ids = torch.zeros(len(text), 3, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_torchmetrics_formula_on_given_embeddings():
    """Embeddings with positive, near-zero and negative mean cosines: torchmetrics averages
    ``100 · cos`` and clamps the mean at 0, and so do we."""
    try:
        from torchmetrics.functional.multimodal.clip_score import clip_score as tm_clip_score
    except Exception as err:
        pytest.skip(f"torchmetrics cannot be imported: {err!r}")
    rng = np.random.default_rng(3)
    for shift in (0.5, 0.0, -0.5):
        img = rng.standard_normal((6, 8)).astype(np.float32)
        txt = (shift * img + rng.standard_normal((6, 8))).astype(np.float32)
        fixed = _Fixed(img, txt)
        images, captions = [torch.zeros(3, 2, 2)] * 6, ["x"] * 6
        reference = float(
            tm_clip_score(images, captions, model_name_or_path=lambda m=fixed: (m, _dummy_processor))
        )
        ours = torchmetrics_clip_score(clip_cosine(img, txt))
        assert abs(ours - reference) < 1e-4, (shift, ours, reference)
        if shift < 0:
            assert ours == reference == 0.0
