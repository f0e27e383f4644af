"""ivcr_jax: InterLLaVA (IVCR-200K) in JAX/Flax NNX for TPU and GPU pods."""

from setuptools import find_packages, setup

setup(
    name="ivcr_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of InterLLaVA for interactive video corpus retrieval",
    packages=find_packages(include=["ivcr_jax", "ivcr_jax.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "transformers==5.24.0",
        "safetensors==0.8.0",
        "tensorflow-datasets==4.9.10",
        "importlib_resources",
        "array_record==0.8.6",
        "grain==0.2.18",
        "ml_collections==1.1.0",
        "numpy>=2.0,<2.5",
        "decord==0.6.0",
        "tqdm",
        "matplotlib==3.11.2",
        "imageio",
        "imageio-ffmpeg",
    ],
    extras_require={
        # torch is pinned exactly: 2.13.0 resolves to a local CPU wheel, anything else pulls CUDA.
        # tensorboard: its own reader checks our event files (tests only; we write them ourselves).
        # nbclient + ipykernel: the notebooks run in a real Jupyter kernel, top to bottom.
        "test": ["pytest", "torch==2.13.0", "peft==0.21.2", "nltk==3.10.4",
                 "tensorboard==2.21.0", "nbclient==0.11.0", "nbformat==5.11.1",
                 "ipykernel==7.4.0"],
    },
)
