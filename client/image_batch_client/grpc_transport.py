"""TorchServe's gRPC inference API (``InferenceAPIsService.Predictions``) without generated stubs.

TorchServe 0.12's inference.proto defines ``PredictionsRequest {string model_name = 1; string
model_version = 2; map<string, bytes> input = 3; ...}`` and ``PredictionResponse {bytes prediction =
1; ...}``. The two messages are declared here at run time (protobuf's descriptor API), so no protoc
step and no copy of TorchServe's files is needed. Each ``input`` entry reaches the handler like a
multipart field (the key is its name, the value its bytes); the response is the handler's body as is.
The HTTP status a handler sets does not travel over gRPC: an error is only in the body.

Token authorization applies: the key travels as gRPC metadata ``authorization: Bearer <key>``
(TorchServe's GRPCInterceptor answers PERMISSION_DENIED without it). Needs ``grpcio`` and
``protobuf``: the client's ``grpc`` extra (``pip install grpcio protobuf``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.pytorch.serve.grpc.inference"
PREDICTIONS = f"/{PACKAGE}.InferenceAPIsService/Predictions"
DEFAULT_ADDRESS = "127.0.0.1:7070"
_FIELD = descriptor_pb2.FieldDescriptorProto


@functools.cache
def _messages() -> tuple[type, type]:
    """The PredictionsRequest and PredictionResponse classes, with TorchServe's field numbers."""
    proto = descriptor_pb2.FileDescriptorProto(name="torchserve_inference_minimal.proto", package=PACKAGE,
                                               syntax="proto3")
    request = proto.message_type.add(name="PredictionsRequest")
    request.field.add(name="model_name", number=1, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL)
    request.field.add(name="model_version", number=2, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL)
    entry = request.nested_type.add(name="InputEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=_FIELD.TYPE_BYTES, label=_FIELD.LABEL_OPTIONAL)
    request.field.add(name="input", number=3, type=_FIELD.TYPE_MESSAGE, label=_FIELD.LABEL_REPEATED,
                      type_name=f".{PACKAGE}.PredictionsRequest.InputEntry")
    response = proto.message_type.add(name="PredictionResponse")
    response.field.add(name="prediction", number=1, type=_FIELD.TYPE_BYTES, label=_FIELD.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.PredictionsRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.PredictionResponse")))


class GrpcPredictions:
    """``GrpcPredictions("127.0.0.1:7070", key).predict("model", {"body": data})`` -> the handler's body."""

    def __init__(self, address: str = DEFAULT_ADDRESS, token: str | None = None) -> None:
        request_class, response_class = _messages()
        self._request_class = request_class
        # Unlimited on this side; TorchServe's own limit is max_request_size (its maxInboundMessageSize).
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                                ("grpc.max_receive_message_length", -1)])
        self._call = self._channel.unary_unary(PREDICTIONS, request_serializer=request_class.SerializeToString,
                                               response_deserializer=response_class.FromString)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def predict(self, model: str, inputs: Mapping[str, bytes], timeout: float | None = None) -> bytes:
        """Raises grpc.RpcError: UNAVAILABLE (no server), PERMISSION_DENIED (key), INTERNAL (e.g. no such model)."""
        request = self._request_class(model_name=model, input=dict(inputs))
        return self._call(request, timeout=timeout, metadata=self._metadata).prediction

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcPredictions:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
