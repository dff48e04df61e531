# role: your SageMaker execution role's ARN; bucket: your S3 bucket (SageMaker Python SDK 2.x)
transformer = model.transformer(instance_count=1, instance_type="ml.m5.xlarge", strategy="SingleRecord",
                                output_path=f"s3://{bucket}/medpipe/batch-out/", accept="application/json")
transformer.transform(f"s3://{bucket}/medpipe/batch-in/", content_type="image/jpeg", split_type=None)
