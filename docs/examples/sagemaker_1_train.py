# role: your SageMaker execution role's ARN; bucket: your S3 bucket (SageMaker Python SDK 2.x)
from sagemaker.pytorch import PyTorch

estimator = PyTorch(
    entry_point="sagemaker_entry.py", source_dir=".",          # this repository; requirements.txt is installed
    role=role, framework_version="2.8.0", py_version="py312",
    instance_count=1, instance_type="ml.g5.xlarge",
    hyperparameters={"budget": "2h", "image-size": 224, "batch-size": 64},  # or "epochs": 30
    checkpoint_s3_uri=f"s3://{bucket}/medpipe/checkpoints",     # Spot interruptions resume from here
    use_spot_instances=True, max_run=6 * 3600, max_wait=8 * 3600,
    metric_definitions=[
        {"Name": "train:loss", "Regex": r"epoch=\d+ train_loss=([0-9.]+)"},
        {"Name": "validation:loss", "Regex": r"val_loss=([0-9.]+)"},
        {"Name": "validation:auc", "Regex": r"val_auc=([0-9.]+)"},
        {"Name": "validation:balanced_accuracy", "Regex": r"val_bacc=([0-9.]+)"},
    ],
)
estimator.fit({"train": f"s3://{bucket}/ham10000/"})   # the HAM10000 folder, dataverse_files.zip, a GT manifest...
