"""Every code block in the README runs, or says why not.

Python and shell blocks without a marker are executed here, in README order, on a tiny pipeline
(model folders replaced by it, offline). A block that needs a download, GPUs, a server or a long
run carries ``<!-- not-run: REASON -->`` on the line(s) before its fence, and each of its commands
is mapped in COVERAGE to the test that runs the same thing on tiny inputs. Adding a block or a
command without either fails here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# README command (its start) → where it runs. Commands on real checkpoints run in the tests on
# the tiny pipelines (the same code, only the folder differs).
COVERAGE = {
    "pip install -e . && instaflow-toy": [
        "test_toy.py::test_tiny_reproduction_writes_every_stage",
        "test_toy.py::test_toy_command_line",
    ],
    'pip install -e ".[test]"': ["CI: .ci/run runs this command verbatim"],
    "instaflow-eval --model": [
        "test_evaluation.py::test_protocol_end_to_end",
        "test_evaluation.py::test_killed_run_resumes_with_identical_results",
    ],
    "hf download": [
        "NETWORK: downloads cannot run offline; the folders they make are the "
        "diffusers layout that test_loading.py and test_models_parity.py load"
    ],
    "instaflow-generate --model tiny-random": ["test_readme.py::test_unmarked_shell_blocks_run"],
    "instaflow-generate --model runs/toy/distill/export": [
        "test_cli.py::test_default_size_is_the_models_native_size",
        "test_toy.py::test_tiny_reproduction_writes_every_stage",
    ],
    "instaflow-generate --model instaflow-0.9B": ["test_cli.py::test_generate_cli_writes_a_grid_and_timings"],
    "instaflow-generate --model 2-rf": ["test_cli.py::test_generate_cli_sampling_options_equal_the_library"],
    "instaflow-generate --model sd15": ["test_cli.py::test_generate_cli_sampling_options_equal_the_library"],
    "instaflow-interpolate": ["test_cli.py::test_interpolate_cli_writes_frames_and_a_gif"],
    "instaflow-generate --attention": ["test_attention.py::test_generate_cli_attention_flag"],
    "instaflow-generate --model instaflow-0.9B --lora": [
        "test_lora.py::test_generate_cli_with_loras_equals_the_library"
    ],
    "instaflow-transfer --base": [
        "test_transfer.py::test_transfer_equals_numpy_arithmetic",
        "test_transfer.py::test_transfer_refuses_other_architectures_and_families",
    ],
    "instaflow-generate --model instaflow-dreambooth": [
        "test_transfer.py::test_transfer_equals_numpy_arithmetic"
    ],
    "instaflow-generate --model instaflow-0.9B --controlnet": [
        "test_controlnet.py::test_generate_cli_with_a_canny_controlnet"
    ],
    'pip install -e ".[demo]" && instaflow-demo': [
        "test_demo.py::test_the_page_in_a_real_browser",
        "test_demo.py::test_help_documents_every_option",
    ],
    "instaflow-demo --model instaflow-0.9B --model2 2-rf --share": [
        "test_demo.py::test_serves_on_127_0_0_1_and_shares_only_when_asked",
        "NETWORK: the public tunnel itself needs the internet",
    ],
    "python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py:tiny": [
        "test_triplets.py::test_command_line_with_the_tiny_config"
    ],
    "python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py \\": [
        "test_triplets.py::test_layout_and_manifest",
        "test_triplets.py::test_bucket_paths_work_end_to_end",
    ],
    "python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py:2rf": [
        "test_configs.py::test_triplet_configs",
    ],
    "python -m instaflow_jax.train --config configs/reflow_sd15.py": [
        "test_training.py::test_reflow_learns",
        "test_configs.py::test_train_configs",
    ],
    "python -m instaflow_jax.train --config configs/distill_sd15.py --workdir": [
        "test_training.py::test_distillation_learns"
    ],
    "python -m instaflow_jax.train --config configs/distill_sd15.py:lpips": [
        "test_training.py::test_lpips_distillation_learns"
    ],
    "python -m instaflow_jax.train --config configs/distill_sd15.py:direct": [
        "test_training.py::test_distillation_learns"
    ],
    "tensorboard --logdir": [
        "test_operations.py::test_tensorboard_holds_scalars_sample_grids_and_hyperparameters",
        "NOT RUN: tensorboard is not a dependency; the test reads the event files it would show",
    ],
    "instaflow-export --workdir": [
        "test_operations.py::test_export_of_a_middle_step_loads_in_pytorch_diffusers",
        "test_operations.py::test_ema_export_and_push_to_hub_with_the_upload_faked",
    ],
    "bash launch/single_gpu.sh": ["test_configs.py::test_single_gpu_launch_runs_the_tiny_distillation"],
    "bash launch/multi_gpu.sh": [
        "test_configs.py::test_launch_scripts_are_valid_bash_and_demand_their_arguments",
        "test_training_multiprocess.py::test_two_fsdp_processes_equal_one_process",
    ],
    "sbatch --nodes=4 launch/slurm_multi_host.sbatch": [
        "test_configs.py::test_launch_scripts_are_valid_bash_and_demand_their_arguments",
        "test_training_multiprocess.py::test_two_fsdp_processes_equal_one_process",
    ],
    "bash launch/tpu_pod.sh": [
        "test_configs.py::test_launch_scripts_are_valid_bash_and_demand_their_arguments",
        "test_training_multiprocess.py::test_two_fsdp_processes_equal_one_process",
    ],
}


def split_commands(block: str) -> list[str]:
    """Shell commands of a bash block (continuations joined, comments dropped)."""
    commands, current = [], ""
    for line in block.splitlines():
        line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        current += line.strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return [c for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for c in split_commands(block)]


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 15
    uncovered = [c for c in commands if not any(c.startswith(prefix) for prefix in COVERAGE)]
    assert not uncovered, f"README commands without a test: {uncovered}"


def test_the_named_tests_exist():
    for places in COVERAGE.values():
        for place in places:
            if "::" not in place:
                continue
            module, name = place.split("::")
            assert name.startswith("test_"), f"{place} is not a test"
            with open(os.path.join(ROOT, "tests", module), encoding="utf-8") as f:
                source = f.read()
            assert re.search(rf"def {re.escape(name)}\(", source), place


def test_the_ci_script_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        script = f.read()
    assert "<!-- test-command -->" in script and 'eval "$test_command"' in script


def test_download_commands_parse_with_the_installed_hf_cli():
    """The README's download lines use the `hf` CLI that huggingface_hub installs, one pattern per
    ``--exclude`` (a second bare pattern would be taken as a file name); checked offline."""
    import shlex
    import shutil
    import subprocess
    import sys

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.startswith("hf download")]
    assert len(lines) == 2
    for line in lines:
        words = shlex.split(line)
        for i, word in enumerate(words):
            if word == "--exclude":
                assert i + 2 >= len(words) or words[i + 2].startswith("--"), line
    # Beside this interpreter first: the venv's scripts, also when the venv is not activated.
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    hf = shutil.which("hf", path=search)
    assert hf, "huggingface_hub's `hf` command is not installed"
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--exclude" in usage and "--local-dir" in usage


# ---------------------------------------------------------------- every block runs or says why


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    reason: str | None  # of a <!-- not-run: REASON --> marker, None when the block runs here


def readme_blocks() -> list[Block]:
    """The README's bash and python blocks, each with the not-run reason of the comments above it."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        reason, k = None, i - 1
        while k >= 0 and lines[k].startswith("<!--"):
            marker = re.fullmatch(r"<!-- not-run: (.*) -->", lines[k])
            reason = marker.group(1).strip() if marker else reason
            k -= 1
        if fence.group(1) in ("bash", "python"):
            blocks.append(Block(fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1, reason))
        i = end + 1
    return blocks


def test_every_block_runs_here_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 20
    for block in blocks:
        assert block.reason is None or len(block.reason) > 10, f"README.md:{block.line}: give a reason"
    run = [(b.lang, b.line) for b in blocks if b.reason is None]
    assert sum(lang == "python" for lang, _ in run) >= 3 and sum(lang == "bash" for lang, _ in run) >= 1, run


def substitute(code: str, replacements: dict[str, str]) -> str:
    """``code`` with each key replaced (model folders → the tiny pipeline and so on)."""
    for old, new in replacements.items():
        code = code.replace(old, new)
    return code


def test_unmarked_python_blocks_run(tiny_pipeline_dir, tmp_path, monkeypatch):
    """In README order, in one namespace, as a reader pastes them into one session."""
    from instaflow_jax.testing import write_synthetic_triplets

    monkeypatch.chdir(tmp_path)
    triplets = write_synthetic_triplets(str(tmp_path / "triplets"), num_samples=64, shard_size=32)
    replacements = {
        '"instaflow-0.9B"': repr(tiny_pipeline_dir),
        '"2-rf"': repr(tiny_pipeline_dir),
        'dtype="bfloat16"': 'dtype="float32"',  # CPU: the programs the other tests compiled
        '"triplets/sd15"': repr(triplets),
        "    ...  # a train step": "    break",
    }
    namespace: dict = {}
    for block in readme_blocks():
        if block.lang == "python" and block.reason is None:
            code = compile(substitute(block.code, replacements), f"README.md:{block.line}", "exec")
            exec(code, namespace)
    # What the blocks promise, checked against numbers computed here.
    pipe = namespace["pipe"]
    native = pipe.native_size
    assert native == (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    assert namespace["images"].shape[1:] == (*native, 3)
    h, w = native[0] // pipe.vae_scale_factor, native[1] // pipe.vae_scale_factor
    assert namespace["latents"].shape == (1, pipe.latent_channels, h, w)
    assert namespace["x1"].shape == namespace["x4"].shape == (1, h, w, pipe.latent_channels)
    assert float(namespace["s"]) >= 0.0
    assert namespace["per_g"].shape == (2, *namespace["images"].shape)  # (the 2-RF's images)
    dz0 = np.asarray(namespace["dz0"])
    assert dz0.shape == namespace["z0"].shape and np.all(np.isfinite(dz0)) and np.any(dz0 != 0)
    assert namespace["batch"]["x1"].shape == (64, 8, 8, 4)


def test_unmarked_shell_blocks_run(tmp_path, monkeypatch):
    """The CLIs in-process (fast), anything else through bash; offline, in a fresh cache."""
    from instaflow_jax.cli import generate, interpolate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    in_process = {"instaflow-generate": generate.main, "instaflow-interpolate": interpolate.main}
    commands = [c for b in readme_blocks() if b.lang == "bash" and b.reason is None for c in commands_of(b)]
    assert commands
    for command in commands:
        words = shlex.split(command)
        if words[0] in in_process:
            assert in_process[words[0]](words[1:]) == 0, command
        else:
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (command, done.stderr)
    # The smoke test: four 64×64 images side by side, 2-pixel gaps; the pipeline in the user cache.
    assert Image.open("smoke.png").size == (4 * 66 - 2, 64)
    assert os.path.isfile(tmp_path / "cache" / "instaflow_jax" / "tiny_random" / "model_index.json")


def commands_of(block: Block) -> list[str]:
    """Shell commands of one block (continuations joined, comments dropped)."""
    return split_commands(block.code)
