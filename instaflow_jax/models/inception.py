"""FID's Inception-v3 in Flax: pytorch-fid's ``InceptionV3`` (output block 3, ``resize_input=True``,
``normalize_input=True``) with its FID blocks, giving the 2048-d pool features FID is computed on.

Images are NHWC float32 in [0, 1]; they are resized to 299×299 (bilinear, ``align_corners=False``,
no antialiasing: PyTorch's ``F.interpolate``), mapped to [-1, 1], and run in float32 with matmul
precision ``HIGHEST``. Parameter names mirror the PyTorch state dict: ``Mixed_5b.branch1x1.conv.weight``
is ``params["Mixed_5b"]["branch1x1"]["conv"]["kernel"]`` (HWIO), ``….bn.{weight,bias,running_mean,
running_var}`` are ``["bn"]["scale" | "bias" | "mean" | "var"]``. The weights are read by
:func:`instaflow_jax.weights.inception.load_fid_inception_params`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_SIZE = 299  # pixels: every input is resized to FID_SIZE × FID_SIZE
FEATURES = 2048  # the pool features' width
BN_EPS = 1e-3  # torchvision's BasicConv2d BatchNorm
HIGHEST = jax.lax.Precision.HIGHEST  # fp32 convolutions on GPU/TPU too (no TF32 / bf16 passes)

Pair = tuple[int, int]


def _pair(v: int | Pair) -> Pair:
    return (v, v) if isinstance(v, int) else tuple(v)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear taps along one axis (``align_corners=False``): (i0, i1, weight of i1). The
    source position ``scale * (i + 0.5) - 0.5`` is rounded to float32 once, as PyTorch's fused
    multiply-add does (``scale`` itself is float32)."""
    if n_in == n_out:
        idx = np.arange(n_out)
        return idx, idx, np.zeros(n_out, np.float32)
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), 0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.clip(src - i0, 0, 1).astype(np.float32)


def resize_bilinear(images: jax.Array, size: Pair) -> jax.Array:
    """[B, H, W, C] → [B, *size, C], exactly ``F.interpolate(mode="bilinear", align_corners=False)``
    (no antialiasing when shrinking, unlike ``jax.image.resize``); dtype kept."""
    (h0, h1, hw), (w0, w1, ww) = _taps(images.shape[1], size[0]), _taps(images.shape[2], size[1])
    ww, hw = jnp.asarray(ww)[:, None], jnp.asarray(hw)[:, None, None]
    x = (1 - ww) * images[:, :, w0] + ww * images[:, :, w1]
    return (1 - hw) * x[:, h0] + hw * x[:, h1]


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm over the last axis: ``(x - mean) / sqrt(var + 1e-3) * scale + bias``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features,)
        scale = self.param("scale", nn.initializers.ones, shape)
        bias = self.param("bias", nn.initializers.zeros, shape)
        mean = self.param("mean", nn.initializers.zeros, shape)
        var = self.param("var", nn.initializers.ones, shape)
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias, symmetric zero padding), BatchNorm, ReLU."""

    features: int
    kernel: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = tuple((p, p) for p in self.padding)
        x = nn.Conv(
            self.features, self.kernel, self.stride, pad, use_bias=False, precision=HIGHEST, name="conv"
        )(x)
        return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def conv(x: jax.Array, name: str, features: int, kernel: Any, stride: Any = 1, padding: Any = 0) -> jax.Array:
    """``BasicConv2d`` named ``name`` (call inside a compact module); kernel/stride/padding as torch's."""
    return BasicConv2d(features, _pair(kernel), _pair(stride), _pair(padding), name=name)(x)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3, stride 1, padding 1, padded zeros not counted (TensorFlow's average pool; the FID patch)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int = 2, padding: int = 0) -> jax.Array:
    """3×3 max pool; padding (with -inf) only in the FID ``Mixed_7c`` patch."""
    return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding), (padding, padding)))


class FIDInceptionA(nn.Module):
    """``Mixed_5b/5c/5d``: 64 + 64 + 96 + ``pool_features`` channels; count_include_pad=False pool."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = conv(x, "branch1x1", 64, 1)
        b5 = conv(conv(x, "branch5x5_1", 48, 1), "branch5x5_2", 64, 5, padding=2)
        b3 = conv(x, "branch3x3dbl_1", 64, 1)
        b3 = conv(conv(b3, "branch3x3dbl_2", 96, 3, padding=1), "branch3x3dbl_3", 96, 3, padding=1)
        bp = conv(avg_pool_3x3(x), "branch_pool", self.pool_features, 1)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """``Mixed_6a`` (torchvision's, unpatched): stride-2 reduction, 384 + 96 + C_in channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = conv(x, "branch3x3", 384, 3, stride=2)
        bd = conv(x, "branch3x3dbl_1", 64, 1)
        bd = conv(conv(bd, "branch3x3dbl_2", 96, 3, padding=1), "branch3x3dbl_3", 96, 3, stride=2)
        return jnp.concatenate([b3, bd, max_pool_3x3(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """``Mixed_6b..6e``: factorised 7×7 branches of width ``channels_7x7``; 4 × 192 channels."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        b1 = conv(x, "branch1x1", 192, 1)
        b7 = conv(conv(x, "branch7x7_1", c7, 1), "branch7x7_2", c7, **row)
        b7 = conv(b7, "branch7x7_3", 192, **col)
        bd = conv(x, "branch7x7dbl_1", c7, 1)
        for i, (width, shape) in enumerate(zip((c7, c7, c7, 192), (col, row, col, row)), start=2):
            bd = conv(bd, f"branch7x7dbl_{i}", width, **shape)
        bp = conv(avg_pool_3x3(x), "branch_pool", 192, 1)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """``Mixed_7a`` (torchvision's, unpatched): stride-2 reduction, 320 + 192 + C_in channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = conv(conv(x, "branch3x3_1", 192, 1), "branch3x3_2", 320, 3, stride=2)
        b7 = conv(x, "branch7x7x3_1", 192, 1)
        b7 = conv(b7, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
        b7 = conv(b7, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
        b7 = conv(b7, "branch7x7x3_4", 192, 3, stride=2)
        return jnp.concatenate([b3, b7, max_pool_3x3(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """``Mixed_7b`` (``pool="avg"``, count_include_pad=False) and ``Mixed_7c`` (``pool="max"``, the
    FID graph's 3×3 stride-1 max pool); 320 + 768 + 768 + 192 = 2048 channels."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = conv(x, "branch1x1", 320, 1)
        b3 = conv(x, "branch3x3_1", 384, 1)
        b3 = [
            conv(b3, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
            conv(b3, "branch3x3_2b", 384, (3, 1), padding=(1, 0)),
        ]
        bd = conv(conv(x, "branch3x3dbl_1", 448, 1), "branch3x3dbl_2", 384, 3, padding=1)
        bd = [
            conv(bd, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
            conv(bd, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0)),
        ]
        pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, stride=1, padding=1)
        bp = conv(pooled, "branch_pool", 192, 1)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """[B, H, W, 3] float in [0, 1] (any H, W ≥ 1) → [B, 2048] float32 pool features: resize to
    299², ``2x - 1``, the Inception-v3 trunk with the FID blocks, global average pool."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = resize_bilinear(jnp.asarray(images, jnp.float32), (FID_SIZE, FID_SIZE))
        x = 2 * x - 1
        x = conv(x, "Conv2d_1a_3x3", 32, 3, stride=2)
        x = conv(x, "Conv2d_2a_3x3", 32, 3)
        x = max_pool_3x3(conv(x, "Conv2d_2b_3x3", 64, 3, padding=1))
        x = conv(x, "Conv2d_3b_1x1", 80, 1)
        x = max_pool_3x3(conv(x, "Conv2d_4a_3x3", 192, 3))
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def inception_features(params: Any, images: jax.Array) -> jax.Array:
    """FID pool features: ``params`` (the ``"params"`` tree of :class:`FIDInceptionV3`), ``images``
    [B, H, W, 3] float in [0, 1] → [B, 2048] float32. Pure: jit/vmap it as needed."""
    return FIDInceptionV3().apply({"params": params}, images)


def abstract_params() -> Any:
    """The param tree's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), computing nothing."""
    model, dummy = FIDInceptionV3(), jax.ShapeDtypeStruct((1, FID_SIZE, FID_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
