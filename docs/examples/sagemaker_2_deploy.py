# role: your SageMaker execution role's ARN; bucket: your S3 bucket (SageMaker Python SDK 2.x)
from sagemaker.deserializers import JSONDeserializer
from sagemaker.pytorch import PyTorchModel
from sagemaker.serializers import IdentitySerializer

model = PyTorchModel(model_data=estimator.model_data, role=role, framework_version="2.6.0", py_version="py312",
                     env={"SAGEMAKER_PROGRAM": "inference.py"})
predictor = model.deploy(initial_instance_count=1, instance_type="ml.m5.xlarge",
                         serializer=IdentitySerializer("image/jpeg"), deserializer=JSONDeserializer())
with open("ISIC_0024306.jpg", "rb") as f:
    result = predictor.predict(f.read())
print(result["predictions"][0]["label"], result["predictions"][0]["probabilities"])
