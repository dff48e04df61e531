"""medpipe: a MONAI/PyTorch pipeline for 2D medical image classification."""

__version__ = "0.1.0"
