import sys, pathlib  # SageMaker script mode: PyTorch(entry_point="sagemaker_entry.py", source_dir=".")  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "src"))  # medpipe from this checkout
from medpipe.sagemaker.training import main, exit_process; __name__ == "__main__" and exit_process(main())  # noqa
