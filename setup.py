"""repmlp-lightning: RepMLP backbones trained with convolutions, deployed as pure FC layers."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="repmlp-lightning",
    version="0.1.0",
    description="RepMLP backbones for classification, face recognition and segmentation with PyTorch Lightning",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["backbones", "backbones.*", "tasks", "tasks.*", "datamodules",
                                    "datamodules.*", "callbacks", "callbacks.*"]) + ["tasks.configs"],
    # a non-editable install ships configs/ as tasks/configs (tasks.lightning.cli looks there when there is
    # no source tree beside the package)
    package_dir={"tasks.configs": "configs"},
    package_data={"tasks.configs": ["*/*.yaml"]},
    # torch is a range, not a pin: install the build for your machine first (README), and pip
    # keeps it; an unpinned request on a machine without torch would pull the CUDA build.
    install_requires=[
        "torch>=2.1",
        # Lightning and jsonargparse are bounded to the releases the suite has passed on: the
        # project relies on their behaviour (tasks/lightning/adapter.py names the internals it reads).
        "pytorch-lightning>=2.6,<2.7",
        "torchmetrics>=1.3",
        "albumentations>=1.4",
        "jsonargparse[signatures]>=4.53,<4.54",
        "fsspec",  # tasks.lightning.checkpoint_io tells local from remote paths as Lightning does
        "safetensors>=0.4",
        "numpy",
        "matplotlib>=3.8",  # tasks.compare's plot
    ],
    extras_require={
        "dev": ["pytest>=7"],
        # backbones.deploy.onnx: the dynamo exporter translates through onnxscript; bounded below by
        # the releases tested
        "onnx": ["onnx>=1.23", "onnxruntime>=1.32", "onnxscript>=0.7"],
        # backbones.deploy.pt2e: torch INT8 (PT2E quantizers); torchao releases follow torch's
        "int8": ["torchao>=0.18"],
        # backbones.weights.io reads HDF5 weight files (the official ACNet code saves its weights so)
        "hdf5": ["h5py>=3.16"],
        # mmcv (needed by mmsegmentation) must be installed first: see README.
        "mmseg": ["mmsegmentation==1.2.2", "ftfy", "regex"],
    },
)
