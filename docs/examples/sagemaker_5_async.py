# role: your SageMaker execution role's ARN; bucket: your S3 bucket (SageMaker Python SDK 2.x)
# Asynchronous Inference: camera-size images and volumes (payloads up to 1 GB, up to one hour each)
from sagemaker.async_inference import AsyncInferenceConfig
from sagemaker.deserializers import JSONDeserializer
from sagemaker.pytorch import PyTorchModel
from sagemaker.serializers import IdentitySerializer

async_model = PyTorchModel(
    model_data=estimator.model_data, role=role, framework_version="2.6.0", py_version="py312",
    env={"SAGEMAKER_PROGRAM": "inference.py",
         "MEDPIPE_SERVE_PROFILE": "async",                  # a medpipe serve container: the async limits
         "TS_MAX_REQUEST_SIZE": str(1024 ** 3),             # TorchServe's own body limit (default 6.5 MB)
         "TS_MAX_RESPONSE_SIZE": str(16 * 1024 ** 2),
         "TS_DEFAULT_RESPONSE_TIMEOUT": "3600"},            # seconds (SAGEMAKER_MODEL_SERVER_TIMEOUT is lost, below)
)
async_predictor = async_model.deploy(
    initial_instance_count=1, instance_type="ml.m5.xlarge",
    serializer=IdentitySerializer("image/jpeg"), deserializer=JSONDeserializer(),
    async_inference_config=AsyncInferenceConfig(
        output_path=f"s3://{bucket}/medpipe/async-out",
        max_concurrent_invocations_per_instance=4,         # = medpipe serve --profile async's --max-requests
    ),
)
# the image is already in S3 (a 24 MP dermatoscope JPEG); the answer is written to output_path
response = async_predictor.predict_async(input_path=f"s3://{bucket}/medpipe/camera/lesion-24mp.jpg")
print(response.output_path)   # response.get_result() waits for it and returns the JSON
