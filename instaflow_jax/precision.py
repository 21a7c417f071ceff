"""Dtype names accepted on the command line and in configs, parsed in one place."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
    "f16": jnp.float16,
}


def parse_dtype(dtype: Any) -> Any:
    """Return a jnp floating dtype from a name (``"bf16"``, ``"float32"`` …) or a dtype.

    Raises ``ValueError`` naming the accepted spellings for anything else.
    """
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key not in _DTYPES:
            raise ValueError(
                f"unknown dtype name {dtype!r}; expected one of {sorted(set(_DTYPES))} "
                "(e.g. 'bfloat16' for compute, 'float32' for parameters)."
            )
        return _DTYPES[key]
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"not a dtype: {dtype!r}; expected e.g. 'float32' or jnp.bfloat16") from err
    if resolved not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype {resolved} is not supported; expected float32, bfloat16 or float16.")
    return resolved.type


def dtype_name(dtype: Any) -> str:
    """Canonical name (``"float32"``, ``"bfloat16"``, ``"float16"``) of a dtype or dtype name."""
    return jnp.dtype(parse_dtype(dtype)).name


def resolve_dtype(name: str) -> str:
    """``"auto"`` → float32 on CPU, bfloat16 on accelerators; any other name unchanged."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
