"""Generate (prompt, X0, X1 = teacher ODE(X0)) triplets, sharded, resumable, on every device.

    python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py:tiny
    python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py --config.output_dir=gs://b/t

Sample ``i`` pairs prompt ``i`` with noise ``fold_in(key(seed), i)``; shard ``k`` holds samples
[k·S, (k+1)·S) and is written by process ``k mod P``; batches are split over the process's local
devices in groups of ``per_device_batch`` consecutive samples. Hence the dataset does not depend
on the number of devices or hosts, and a killed job re-run with the same command skips finished
shards, rebuilds the rest and ends with exactly the same dataset. Finished shards are checked
without reading them (``verify="size"``: the sidecar's own checksum and the file size recorded at
write time); ``--config.verify=full`` also re-hashes every shard file against its recorded sha256.
The first batch runs (and compiles) before the progress bar starts, so rate and ETA exclude it.

The output folder is proven writable before any work. A teacher output holding NaN/inf stops the
job with its shard, batch, sample indices, prompts and the likely cause, before anything of that
shard is written: ``Pipeline.generate`` flags non-finite samples on device (fetched with the
output, no extra synchronisation), and the stored cast (float16 may overflow) is checked on the
host copy the job already holds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from instaflow_jax.config_utils import from_dict
from instaflow_jax.conventions import latent_shape, nchw_to_nhwc, nhwc_to_nchw
from instaflow_jax.data.prompts import PromptSource, load_prompts, prompts_digest
from instaflow_jax.data.shards import (
    ShardError,
    check_size,
    read_sidecar,
    shard_name,
    verify_shard,
    write_json,
    write_shard,
)
from instaflow_jax.data.triplets import (
    FORMAT,
    VERSION,
    ShardPlan,
    manifest_differences,
    manifest_path,
    read_manifest,
)
from instaflow_jax.files import ensure_writable_folder
from instaflow_jax.parallel import initialize_distributed, make_mesh, pad_batch
from instaflow_jax.phases import phase
from instaflow_jax.precision import dtype_name, parse_dtype
from instaflow_jax.progress import progress_bar
from instaflow_jax.sampling.noise import noise_for_indices
from instaflow_jax.sampling.text_to_image import SD_TEACHER, NonFiniteOutputError, TeacherSpec

log = logging.getLogger(__name__)
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a dead writer
VERIFY_MODES = ("size", "full")


class NonFiniteTeacherError(ValueError):
    """The teacher returned NaN or ±inf latents: the job stops before writing them."""


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The teacher whose ODE solutions are stored: its weights, dtypes and :class:`TeacherSpec`.

    Defaults: the SD 1.5 teacher of the reflow data (docs/method.md §4.1, :data:`SD_TEACHER`:
    25-step DPM-Solver++, CFG 5, empty negative prompt). The ``:2rf`` variant of
    ``configs/triplets_sd15.py`` stores the 2-RF's targets instead (``euler``, CFG 1.5: the
    online distillation targets' defaults, ``train.config.TeacherConfig``).
    """

    model: str = "stable-diffusion-v1-5"  # folder, cached hub id, or "tiny-random"
    solver: str = SD_TEACHER.solver  # SD teacher; "euler" for a rectified-flow teacher (2-RF)
    num_steps: int = SD_TEACHER.num_steps
    guidance_scale: float = SD_TEACHER.guidance_scale
    negative_prompt: str = SD_TEACHER.negative_prompt
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    def spec(self) -> TeacherSpec:
        """How this teacher samples (the same function computes online distillation targets)."""
        return TeacherSpec(self.solver, self.num_steps, self.guidance_scale, self.negative_prompt)


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
    # How a resume checks finished shards: "size" (the sidecar's own checksum and the file size
    # recorded at write time; no shard data read) or "full" (also re-hash every shard file).
    verify: str = "size"

    @classmethod
    def from_config(cls, config: Any) -> TripletJob:
        job = from_dict(cls, config)
        if job.shard_size < 1 or job.per_device_batch < 1:
            raise ValueError("shard_size and per_device_batch must be ≥ 1.")
        if job.latent_dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"latent_dtype {job.latent_dtype!r}; expected float16, bfloat16 or float32.")
        if job.verify not in VERIFY_MODES:
            raise ValueError(f"verify {job.verify!r}; expected one of {VERIFY_MODES}.")
        job.teacher.spec()  # a solver or step count the teacher cannot run fails here, before any work
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
        existing = read_manifest(folder)
        if existing["version"] != manifest["version"]:
            raise ValueError(
                f"{folder} holds triplets of format v{existing['version']}, written by an older "
                f"instaflow-jax; this one writes v{manifest['version']} (checksummed sidecars). Finish "
                "that dataset with the version that started it, or use a new output_dir."
            )
        differences = manifest_differences(existing, manifest)
        if differences:
            raise ValueError(
                f"{folder} already holds triplets made differently: "
                + "; ".join(differences)
                + ". Use another output_dir, or the original config to resume."
            )
        return
    write_json(manifest_path(folder), manifest)


def pending_shards(folder: epath.Path, mine: list[int], verify: str = "size") -> list[int]:
    """Shards of ``mine`` still to write; their writers' stale temporary files are removed.

    A finished shard (one with a sidecar) is kept when its sidecar passes its ``json_sha256``
    checksum and its file has the size recorded at write time (``verify="size"``: no shard data is
    read), plus, with ``verify="full"``, when the file matches the recorded sha256, layout,
    indices and finiteness (every file read once, with a progress bar). One that fails is rebuilt.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify {verify!r}; expected one of {VERIFY_MODES}.")
    finished = [shard for shard in mine if (folder / f"{shard_name(shard)}.json").exists()]
    progress = None
    if verify == "full" and finished:
        progress = progress_bar(total=len(finished), unit="shard", desc="verifying finished shards (full)")
    todo = []
    for shard in mine:
        sidecar_path = folder / f"{shard_name(shard)}.json"
        if shard in finished:
            try:
                sidecar = read_sidecar(sidecar_path)
                (verify_shard if verify == "full" else check_size)(folder, sidecar)
                continue
            except ShardError as err:
                log.warning("rebuilding %s: %s", shard_name(shard), err)
                sidecar_path.unlink()
            finally:
                if progress is not None:
                    progress.update(1)
        todo.append(shard)
        _remove_stale_temporaries(folder, shard)
    if progress is not None:
        progress.close()
    return todo


def _remove_stale_temporaries(folder: epath.Path, shard: int) -> None:
    """Delete ``shard-K.*.tmp`` left by killed writers (older than ``STALE_TMP_S``; a live writer's
    temporary file is seconds old). Files whose age is unknown (mtime 0) are kept."""
    now = time.time()
    for path in epath.Path(folder).glob(f"{shard_name(shard)}.*.tmp"):
        try:
            mtime = path.stat().mtime
            if mtime and now - mtime > STALE_TMP_S:
                path.unlink()
        except (OSError, RuntimeError):  # removed or renamed by its writer first; odd bucket metadata
            pass


def check_finite(
    x1: np.ndarray,
    stored: np.ndarray,
    chunk: np.ndarray,
    shard: int,
    prompts: list[str],
    teacher: TeacherConfig,
) -> None:
    """Stop with a clear error if a sample's latents ``x1`` [k, h, w, C] (float32, as returned) or
    their stored cast ``stored`` hold NaN or ±inf; ``chunk`` holds the k global sample indices."""
    finite = np.isfinite(x1.reshape(len(chunk), -1)).all(axis=1)
    stored_finite = np.isfinite(stored.reshape(len(chunk), -1)).all(axis=1)
    if finite.all() and stored_finite.all():
        return
    if finite.all():
        bad = chunk[~stored_finite]
        cause = (
            f"the teacher's latents are finite but overflow latent_dtype={stored.dtype} when stored; "
            "use latent_dtype='float32'"
        )
    else:
        bad = chunk[~finite]
        cause = (
            "every sample of the batch is non-finite, so the teacher itself is broken: NaN/inf in its "
            "weights (check the model folder), a guidance scale or step count its solver cannot "
            f"handle (guidance {teacher.guidance_scale}, {teacher.num_steps} {teacher.solver} steps), "
            f"or overflow in teacher.dtype={teacher.dtype} (try float32)"
            if not finite.any()
            else f"the teacher diverges on these prompts (overflow in teacher.dtype={teacher.dtype}? "
            "try float32), or NaN/inf in its weights"
        )
    shown = ", ".join(repr(prompts[i]) for i in bad[:3]) + (" …" if len(bad) > 3 else "")
    raise NonFiniteTeacherError(
        f"non-finite (NaN/inf) teacher output for {len(bad)} of {len(chunk)} samples of the batch "
        f"{int(chunk[0])}–{int(chunk[-1])} of {shard_name(shard)}: sample indices "
        f"{bad[:10].tolist()}{' …' if len(bad) > 10 else ''}, prompts {shown}. Likely cause: {cause}. "
        "Nothing of this shard was written; finished shards are kept."
    )


def _teacher_batch(
    pipe: Any,
    job: TripletJob,
    prompts: list[str],
    shape: tuple[int, ...],
    group: int,
    shard: int,
    chunk: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher latents of the samples ``chunk`` (global indices, at most ``group``): X1 in
    ``latent_dtype`` and X0 float32, each [k, h, w, C] NHWC; checked finite (else an error)."""
    teacher, spec = job.teacher, job.teacher.spec()
    padded = pad_batch(chunk, group)  # the last index repeated: the same groups always
    noise = np.asarray(noise_for_indices(job.seed, padded, shape))
    try:  # the pipeline checks finiteness on device (per-sample flags fetched with the output)
        latents = pipe.generate(
            [prompts[i] for i in padded], num_steps=spec.num_steps,
            guidance_scale=spec.guidance_scale, negative_prompt=spec.negative_prompt,
            latents=nhwc_to_nchw(noise), height=job.height, width=job.width,
            solver=spec.solver, output_type="latent",
        )  # fmt: skip
    except NonFiniteOutputError as err:
        raise NonFiniteTeacherError(
            f"non-finite (NaN/inf) teacher output in the batch of samples {int(chunk[0])}–"
            f"{int(chunk[-1])} of {shard_name(shard)} (batch position i is dataset sample "
            f"{int(chunk[0])} + i): {err} Nothing of this shard was written; finished shards "
            "are kept."
        ) from err
    x1_batch = nchw_to_nhwc(latents)[: len(chunk)]  # on the host already: checks cost no sync
    with np.errstate(over="ignore"):  # an overflow is reported by check_finite
        stored = x1_batch.astype(parse_dtype(job.latent_dtype))
    check_finite(x1_batch, stored, chunk, shard, prompts, teacher)
    return stored, noise[: len(chunk)]


def generate_triplets(
    config: Any,
    process_index: int | None = None,
    process_count: int | None = None,
    devices: list[Any] | None = None,
) -> epath.Path:
    """Run (or resume) a triplet job; returns the dataset folder. Process info defaults to JAX's."""
    import instaflow_jax
    from instaflow_jax.weights.tiny import resolve_model

    job = TripletJob.from_config(config)
    if job.distributed:
        initialize_distributed()  # auto-detected (TPU pods, SLURM); generous start-up timeout
    folder = ensure_writable_folder(job.output_dir, "output_dir")  # before any work
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    prompts = load_prompts(job.prompts)
    mesh = make_mesh(devices)
    teacher = job.teacher
    with phase(f"loading teacher {teacher.model}"):
        pipe = instaflow_jax.load_pipeline(
            resolve_model(teacher.model), dtype=teacher.dtype, param_dtype=teacher.param_dtype, mesh=mesh
        )
    shape = latent_shape(1, job.height, job.width, pipe.latent_channels, pipe.vae_scale_factor)[1:]
    ensure_manifest(folder, build_manifest(job, pipe, prompts, shape))

    plan = ShardPlan(len(prompts), job.shard_size)
    with phase(f"checking finished shards (verify={job.verify})", job.verify == "size"):
        todo = pending_shards(folder, plan.shards_of_process(process_index, process_count), job.verify)
    group = job.per_device_batch * mesh.size
    total = sum(len(plan.indices(k)) for k in todo)
    batch_args = (pipe, job, prompts, shape, group)
    first = {}  # the first batch, run before the progress bar so that its rate excludes compiling
    if todo:
        with phase("compiling the teacher (and running the first batch)"):
            first[todo[0], 0] = _teacher_batch(*batch_args, todo[0], plan.indices(todo[0])[:group])
    desc = f"triplets (process {process_index}/{process_count})"
    progress = progress_bar(total=total, unit="sample", desc=desc)
    for shard in todo:
        indices = plan.indices(shard)
        x1, x0 = [], []
        for start in range(0, len(indices), group):
            chunk = indices[start : start + group]
            stored, noise = first.pop((shard, start), None) or _teacher_batch(*batch_args, shard, chunk)
            x1.append(stored)
            x0.append(noise)
            progress.update(len(chunk))
        arrays = {"x1": np.concatenate(x1)}
        if job.store_x0:
            arrays["x0"] = np.concatenate(x0).astype(np.float32)
        write_shard(folder, shard, arrays, indices, [prompts[i] for i in indices])
    progress.close()
    return folder


def run() -> None:
    """Console entry point: ``--config file.py[:variant]`` plus ``--config.key=value`` overrides."""
    from absl import app, flags
    from ml_collections import config_flags

    from instaflow_jax.entry import exit_on_user_errors, run_absl

    config = config_flags.DEFINE_config_file(
        "config", None, "job config, e.g. configs/triplets_sd15.py:tiny", lock_config=True
    )
    flags.mark_flag_as_required("config")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        print(f"writing triplets to {config.value.output_dir}", flush=True)
        with exit_on_user_errors():
            print(f"triplets in {generate_triplets(config.value)}")

    run_absl(main)


if __name__ == "__main__":
    run()
