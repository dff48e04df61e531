"""medpipe: a MONAI/PyTorch pipeline for 2D medical image classification.

Installed as the distribution ``medpipe-imaging`` (``pip install medpipe-imaging``); imported and run as
``medpipe``. ``__version__`` below is the one place the version is written: the package metadata reads it
at build time (pyproject ``[tool.setuptools.dynamic]``).
"""

__version__ = "0.1.0"
