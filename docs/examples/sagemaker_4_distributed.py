# role: your SageMaker execution role's ARN; bucket: your S3 bucket (SageMaker Python SDK 2.x)
from sagemaker.pytorch import PyTorch

ddp = PyTorch(entry_point="sagemaker_entry.py", source_dir=".", role=role, instance_count=2,
              instance_type="ml.g5.12xlarge", framework_version="2.8.0", py_version="py312",
              distribution={"torch_distributed": {"enabled": True}}, hyperparameters={"epochs": 30, "image-size": 224})
ddp.fit({"train": f"s3://{bucket}/ham10000/"})
