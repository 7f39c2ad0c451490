"""draft-opd: speculative decoding and on-policy distillation of draft models, in JAX."""

from setuptools import find_packages, setup

setup(
    name="draft-opd",
    version="0.1.0",
    description="Lossless speculative decoding (EAGLE-3, DFlash) and Draft-OPD drafter training in JAX",
    python_requires=">=3.10",
    packages=find_packages(include=["opd", "opd.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.10",
        "array_record>=0.7",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "safetensors>=0.4",
        "gguf>=0.16",
        "tokenizers>=0.20",
        "jinja2>=3.1",
        "tqdm",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "matplotlib",
        "fsspec",  # gs:// (any URL) workdirs: opd.remote
    ],
    extras_require={
        # Parity checks against PyTorch/transformers only; never imported by the library.
        # nbclient / nbformat / ipykernel execute the colab/ notebooks (tests/test_colab.py).
        # tests/interop/test_dflash_zlab.py also runs z-lab's `dflash==0.1.0`, installed by .ci/run
        # with --no-deps (its metadata pins datasets / tqdm / requests that its model does not use).
        # jax[tpu] brings libtpu: tests/pallas_kernels/test_tpu_compile.py compiles for TPU topologies on CPU hosts.
        "test": ["pytest>=8", "jax[tpu]", "torch==2.13.0", "transformers>=5.0,<6", "accelerate", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29"],
        # gs:// workdirs, targets and drafters (opd.remote through fsspec).
        "gcs": ["gcsfs"],
    },
)
