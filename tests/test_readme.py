"""Every command in the README is exercised by a test (or by CI), and this file says which.

Adding a command to the README without saying here how it is tested fails this test.
"""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# README command (its start) → where it runs. Commands on real checkpoints run in the tests on
# the tiny pipelines (the same code, only the folder differs).
COVERAGE = {
    "pip install -e . && instaflow-toy": [
        "test_toy.py::test_tiny_reproduction_writes_every_stage",
        "test_toy.py::test_toy_command_line",
    ],
    'pip install -e ".[test]"': ["CI: .ci/run runs this command verbatim"],
    "hf download": [
        "NETWORK: downloads cannot run offline; the folders they make are the "
        "diffusers layout that test_loading.py and test_models_parity.py load"
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
    "bash launch/single_gpu.sh": ["test_configs.py::test_single_gpu_launch_runs_the_tiny_distillation"],
    "bash launch/multi_gpu.sh": [
        "test_configs.py::test_launch_scripts_are_valid_bash_and_demand_their_arguments",
        "test_training.py::test_two_fsdp_processes_equal_one_process",
    ],
    "sbatch --nodes=4 launch/slurm_multi_host.sbatch": [
        "test_configs.py::test_launch_scripts_are_valid_bash_and_demand_their_arguments",
        "test_training.py::test_two_fsdp_processes_equal_one_process",
    ],
    "bash launch/tpu_pod.sh": [
        "test_configs.py::test_launch_scripts_are_valid_bash_and_demand_their_arguments",
        "test_training.py::test_two_fsdp_processes_equal_one_process",
    ],
}


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks (continuations joined, comments dropped)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        current = ""
        for line in block.splitlines():
            line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
            if not line:
                continue
            current += line.strip() + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


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

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.startswith("hf download")]
    assert len(lines) == 2
    for line in lines:
        words = shlex.split(line)
        for i, word in enumerate(words):
            if word == "--exclude":
                assert i + 2 >= len(words) or words[i + 2].startswith("--"), line
    hf = shutil.which("hf")
    assert hf, "huggingface_hub's `hf` command is not installed"
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--exclude" in usage and "--local-dir" in usage
