"""SageMaker script-mode entry point: PyTorch(entry_point="sagemaker_entry.py", source_dir=".")

The estimator copies this repository (source_dir) into the container and installs requirements.txt;
this script puts ``src/`` on the path when medpipe is not installed, and runs the training contract.
"""

import sys
from pathlib import Path

try:
    import medpipe  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from medpipe.cli import exit_process
from medpipe.sagemaker import main

if __name__ == "__main__":
    exit_process(main())
