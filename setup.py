"""Packaging for instaflow-jax: one-step text-to-image (InstaFlow) in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2",
    "orbax-checkpoint>=0.11",
    "ml_collections>=1.0",
    "ml_dtypes>=0.5",
    "numpy>=1.26",
    "msgpack>=1.0",
    "safetensors>=0.4",
    "transformers>=4.40",  # CLIPTokenizer only; no torch needed
    "tokenizers>=0.19",
    "pillow>=10",
    "tqdm>=4.60",
    "etils[epath]>=1.7",
    "grain>=0.2.18",  # the training input pipeline (data/loader.py)
    "absl-py>=1.0",
    "tensorflow-datasets>=4.9",  # caption sources, read without TensorFlow
    "array_record>=0.5",
    "importlib_resources",  # needed by tensorflow-datasets' builder_from_directory
    "pyarrow>=14",  # parquet prompt files
    "lpips-j>=0.0.6",  # LPIPS-VGG for distillation (weights read locally, see train/lpips.py)
    "h5py>=3",
    "matplotlib>=3.7",  # metric plots and evaluation figures
    "scipy>=1.11",  # FID's matrix square root (toy evaluation)
    "huggingface_hub>=0.24",  # reading the local Hugging Face cache; the `hf download` command
    "tensorboardX>=2.6",  # TensorBoard event files of training runs (no TensorFlow)
]

EXTRAS = {
    # Reference implementations for parity tests. torch is pinned: a CPU build of exactly this
    # version is what the test machines provide.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",  # the suite runs on 2 workers (-n 2): compiling is single-threaded
        "ruff>=0.6",
        "torch==2.13.0",
        "diffusers>=0.35",
        "transformers>=4.40",
        "peft>=0.17",  # diffusers' load_lora_weights (LoRA parity tests)
        "opencv-python-headless>=4.8",  # cv2.Canny, the reference of the canny edge helper
        "gradio>=6,<7",  # the web demo; its browser test drives Debian's chromium with Selenium
        "selenium>=4.20",
        "torchmetrics>=1.9",  # CLIPScore's formula (the CLIP score parity test)
        "lightning-utilities>=0.15",
        # pytorch-fid (the FID references) is installed with --no-deps by the README's test command:
        # it requires torchvision, whose PyPI builds are CUDA builds that fail to import beside the
        # CPU torch of the test machines; tests/test_inception.py stands in for the few classes used.
    ],
    # instaflow-demo, the local web page
    "demo": ["gradio>=6,<7"],
    "gpu": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
}

setup(
    name="instaflow_jax",
    version="0.1.0",
    description="InstaFlow (one-step text-to-image with Rectified Flow) in JAX/Flax",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["instaflow_jax", "instaflow_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "instaflow-generate=instaflow_jax.cli.generate:main",
            "instaflow-interpolate=instaflow_jax.cli.interpolate:main",
            "instaflow-transfer=instaflow_jax.cli.transfer:main",
            "instaflow-demo=instaflow_jax.cli.demo:main",
            "instaflow-generate-triplets=instaflow_jax.generate_triplets:run",
            "instaflow-train=instaflow_jax.train.__main__:run",
            "instaflow-export=instaflow_jax.cli.export:main",
            "instaflow-eval=instaflow_jax.cli.evaluate:main",
            "instaflow-convert-inception=instaflow_jax.cli.convert_inception:main",
            "instaflow-toy=instaflow_jax.examples.toy.main:run",
        ]
    },
)
