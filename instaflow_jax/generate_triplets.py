"""Generate (prompt, X0, X1 = teacher ODE(X0)) triplets, sharded, resumable, on every device.

    python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py:tiny
    python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py --config.output_dir=gs://b/t

Sample ``i`` pairs prompt ``i`` with noise ``fold_in(key(seed), i)``; shard ``k`` holds samples
[k·S, (k+1)·S) and is written by process ``k mod P``; batches are split over the process's local
devices in groups of ``per_device_batch`` consecutive samples. Hence the dataset does not depend
on the number of devices or hosts, and a killed job re-run with the same command skips finished
shards (verified by checksum), rebuilds the rest and ends with exactly the same dataset.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from instaflow_jax.config_utils import from_dict
from instaflow_jax.conventions import latent_shape, nchw_to_nhwc, nhwc_to_nchw
from instaflow_jax.data.prompts import PromptSource, load_prompts, prompts_digest
from instaflow_jax.data.shards import ShardError, shard_name, verify_shard, write_json, write_shard
from instaflow_jax.data.triplets import (
    FORMAT,
    VERSION,
    ShardPlan,
    list_complete_shards,
    manifest_differences,
    manifest_path,
    read_manifest,
)
from instaflow_jax.parallel import make_mesh
from instaflow_jax.precision import dtype_name, parse_dtype
from instaflow_jax.sampling.noise import noise_for_indices

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    model: str = "stable-diffusion-v1-5"  # folder, cached hub id, or "tiny-random"
    solver: str = "dpmpp2m"  # SD teacher; "euler" for a rectified-flow teacher (2-RF)
    num_steps: int = 25
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    dtype: str = "bfloat16"
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class TripletJob:
    """A triplet-generation job (see ``configs/triplets_sd15.py``)."""

    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    prompts: PromptSource = dataclasses.field(default_factory=PromptSource)
    output_dir: str = "triplets"
    height: int = 512
    width: int = 512
    seed: int = 0
    shard_size: int = 1024
    per_device_batch: int = 8
    latent_dtype: str = "float16"
    store_x0: bool = False
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host)

    @classmethod
    def from_config(cls, config: Any) -> TripletJob:
        job = from_dict(cls, config)
        if job.shard_size < 1 or job.per_device_batch < 1:
            raise ValueError("shard_size and per_device_batch must be ≥ 1.")
        if job.latent_dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"latent_dtype {job.latent_dtype!r}; expected float16, bfloat16 or float32.")
        return job


def build_manifest(job: TripletJob, pipe: Any, prompts: list[str], shape: tuple[int, ...]) -> dict[str, Any]:
    teacher = dataclasses.asdict(job.teacher)
    teacher["dtype"] = dtype_name(teacher["dtype"])
    teacher["param_dtype"] = dtype_name(teacher["param_dtype"])
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher,
        "image_size": [job.height, job.width],
        "latent": {
            "height": shape[0],
            "width": shape[1],
            "channels": shape[2],
            "layout": "NHWC",
            "scaling_factor": pipe.latent_scale,
            "dtype": job.latent_dtype,
            "x0_dtype": "float32",
        },
        "seed": job.seed,
        "store_x0": job.store_x0,
        "num_samples": len(prompts),
        "shard_size": job.shard_size,
        "prompts": {
            "source": job.prompts.describe(),
            "count": len(prompts),
            "sha256": prompts_digest(prompts),
        },
    }


def ensure_manifest(folder: epath.Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or check that an existing one describes the same job."""
    if manifest_path(folder).exists():
        differences = manifest_differences(read_manifest(folder), manifest)
        if differences:
            raise ValueError(
                f"{folder} already holds triplets made differently: "
                + "; ".join(differences)
                + ". Use another output_dir, or the original config to resume."
            )
        return
    write_json(manifest_path(folder), manifest)


def pending_shards(folder: epath.Path, mine: list[int]) -> list[int]:
    """Shards of ``mine`` still to write; finished ones failing their checksum are rebuilt."""
    complete = list_complete_shards(folder)
    todo = []
    for shard in mine:
        if shard in complete:
            try:
                verify_shard(folder, complete[shard])
                continue
            except ShardError as err:
                log.warning("rebuilding %s: %s", shard_name(shard), err)
                (folder / f"{shard_name(shard)}.json").unlink()
        todo.append(shard)
    return todo


def generate_triplets(
    config: Any,
    process_index: int | None = None,
    process_count: int | None = None,
    devices: list[Any] | None = None,
) -> epath.Path:
    """Run (or resume) a triplet job; returns the dataset folder. Process info defaults to JAX's."""
    import instaflow_jax
    from instaflow_jax.cli.common import resolve_model

    job = TripletJob.from_config(config)
    if job.distributed:
        jax.distributed.initialize()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    prompts = load_prompts(job.prompts)
    mesh = make_mesh(devices)
    teacher = job.teacher
    pipe = instaflow_jax.load_pipeline(
        resolve_model(teacher.model), dtype=teacher.dtype, param_dtype=teacher.param_dtype, mesh=mesh
    )
    shape = latent_shape(1, job.height, job.width, pipe.latent_channels, pipe.vae_scale_factor)[1:]
    folder = epath.Path(job.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ensure_manifest(folder, build_manifest(job, pipe, prompts, shape))

    plan = ShardPlan(len(prompts), job.shard_size)
    todo = pending_shards(folder, plan.shards_of_process(process_index, process_count))
    group = job.per_device_batch * mesh.size
    total = sum(len(plan.indices(k)) for k in todo)
    progress = tqdm(total=total, unit="sample", desc=f"triplets (process {process_index}/{process_count})")
    for shard in todo:
        indices = plan.indices(shard)
        x1, x0 = [], []
        for start in range(0, len(indices), group):
            chunk = indices[start : start + group]
            padded = np.concatenate([chunk, np.full(group - len(chunk), chunk[-1])])  # same groups always
            noise = np.asarray(noise_for_indices(job.seed, padded, shape))
            latents = pipe.generate(
                [prompts[i] for i in padded], num_steps=teacher.num_steps,
                guidance_scale=teacher.guidance_scale, negative_prompt=teacher.negative_prompt,
                latents=nhwc_to_nchw(noise), height=job.height, width=job.width,
                solver=teacher.solver, output_type="latent",
            )  # fmt: skip
            x1.append(nchw_to_nhwc(latents)[: len(chunk)])
            x0.append(noise[: len(chunk)])
            progress.update(len(chunk))
        arrays = {"x1": np.concatenate(x1).astype(parse_dtype(job.latent_dtype))}
        if job.store_x0:
            arrays["x0"] = np.concatenate(x0).astype(np.float32)
        write_shard(folder, shard, arrays, indices, [prompts[i] for i in indices])
    progress.close()
    return folder


def run() -> None:
    """Console entry point: ``--config file.py[:variant]`` plus ``--config.key=value`` overrides."""
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    from instaflow_jax.cli.common import USER_ERRORS, run_absl

    config = config_flags.DEFINE_config_file(
        "config", None, "job config, e.g. configs/triplets_sd15.py:tiny", lock_config=True
    )
    flags.mark_flag_as_required("config")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        from instaflow_jax.train.__main__ import quiet_logs

        quiet_logs()
        try:
            print(f"triplets in {generate_triplets(config.value)}")
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    run_absl(main)


if __name__ == "__main__":
    run()
