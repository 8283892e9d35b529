"""The testing server speaks TF Serving's protocol: raw gRPC stubs and HTTP, no asl_tf client."""

import json
import os
import pathlib
import re
import urllib.error
import urllib.request

from google.protobuf import text_format
import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from asl_tf.serving import testing_server
from asl_tf.serving import warmup

REPO = pathlib.Path(__file__).resolve().parents[2]
SIGNATURE_KEYS = {
    "serving_default": ({"features", "lengths"},
                        {"segments_sec", "segments_grid", "scores", "labels", "num_detections"}),
    "detect_full": ({"features"},
                    {"segments_sec", "segments_grid", "scores", "labels", "num_detections"}),
    "raw_scores": ({"features", "lengths"}, {"cls_scores", "offsets", "points", "valid"}),
}


@pytest.fixture(scope="module")
def stub(server):
  with grpc.insecure_channel(server.address, testing_server.GRPC_MESSAGE_OPTIONS) as channel:
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _request(signature="serving_default", model="asl", version=None, **inputs):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  request.model_spec.signature_name = signature
  if version is not None:
    request.model_spec.version.value = version
  for key, value in inputs.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  return request


def _features(batch, frames, channels=8, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, frames, channels)).astype(np.float32)


def _grpc_error(stub, request):
  with pytest.raises(grpc.RpcError) as info:
    stub.Predict(request, timeout=10)
  return info.value.code(), info.value.details()


@pytest.mark.parametrize("signature", sorted(SIGNATURE_KEYS))
def test_predict_equals_direct_signature_call(stub, stand_in, signature):
  features = _features(3, 17)
  inputs = {"features": features}
  if "lengths" in SIGNATURE_KEYS[signature][0]:
    inputs["lengths"] = np.array([17, 9, 4], np.int32)
  response = stub.Predict(_request(signature, **inputs), timeout=10)
  want = stand_in.call(signature, **inputs)
  assert set(response.outputs) == SIGNATURE_KEYS[signature][1]
  for key, value in want.items():
    got = tf.make_ndarray(response.outputs[key])
    assert got.dtype == value.dtype, key
    np.testing.assert_array_equal(got, value, err_msg=key)
  assert response.model_spec.name == "asl"
  assert response.model_spec.version.value == stand_in.latest_version
  assert response.model_spec.signature_name == signature


def test_empty_signature_name_means_serving_default(stub, stand_in):
  inputs = {"features": _features(1, 6), "lengths": np.array([5], np.int32)}
  response = stub.Predict(_request("", **inputs), timeout=10)
  np.testing.assert_array_equal(tf.make_ndarray(response.outputs["scores"]),
                                stand_in.call("serving_default", **inputs)["scores"])
  assert response.model_spec.signature_name == "serving_default"


def test_output_filter_returns_only_requested_outputs(stub):
  request = _request(features=_features(1, 6), lengths=np.array([6], np.int32))
  request.output_filter.extend(["scores", "labels"])
  assert set(stub.Predict(request, timeout=10).outputs) == {"scores", "labels"}
  request.output_filter.append("nope")
  code, details = _grpc_error(stub, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in details


def test_metadata_lists_the_three_signatures(stub, stand_in):
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
  request.model_spec.name = "asl"
  response = stub.GetModelMetadata(request, timeout=10)
  sig_map = get_model_metadata_pb2.SignatureDefMap()
  assert response.metadata["signature_def"].Unpack(sig_map)
  assert response.model_spec.version.value == stand_in.latest_version
  assert set(sig_map.signature_def) == set(SIGNATURE_KEYS)
  for name, (inputs, outputs) in SIGNATURE_KEYS.items():
    sig = sig_map.signature_def[name]
    assert set(sig.inputs) == inputs and set(sig.outputs) == outputs, name
  features = sig_map.signature_def["serving_default"].inputs["features"]
  assert features.dtype == tf.float32.as_datatype_enum
  assert [d.size for d in features.tensor_shape.dim] == [-1, -1, stand_in.input_dim]


def test_metadata_needs_a_supported_field(stub):
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = "asl"
  for fields in ([], ["model_status"]):
    request.ClearField("metadata_field")
    request.metadata_field.extend(fields)
    with pytest.raises(grpc.RpcError) as info:
      stub.GetModelMetadata(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# The stand-in's signatures: features DT_FLOAT [-1,-1,8], lengths DT_INT32 [-1].
@pytest.mark.parametrize("inputs, names", [
    ({"features": np.zeros((1, 5, 8)), "lengths": np.array([5], np.int32)},
     ["'features'", "DT_DOUBLE", "DT_FLOAT [-1,-1,8]"]),
    ({"features": np.zeros((5, 8), np.float32), "lengths": np.array([5], np.int32)},
     ["'features'", "[5,8]", "DT_FLOAT [-1,-1,8]"]),
    ({"features": np.zeros((1, 5, 3), np.float32), "lengths": np.array([5], np.int32)},
     ["'features'", "[1,5,3]", "[-1,-1,8]"]),
    ({"features": np.zeros((1, 5, 8), np.float32), "lengths": np.array([5], np.int64)},
     ["'lengths'", "DT_INT64", "DT_INT32 [-1]"]),
    ({"features": np.zeros((1, 5, 8), np.float32)},
     ["missing input 'lengths'", "DT_INT32 [-1]"]),
    ({"features": np.zeros((1, 5, 8), np.float32), "lengths": np.array([5], np.int32),
      "fps": np.array([30.0], np.float32)}, ["unexpected input 'fps'"]),
])
def test_bad_inputs_are_invalid_argument_naming_the_input(stub, inputs, names):
  code, details = _grpc_error(stub, _request(**inputs))
  assert code == grpc.StatusCode.INVALID_ARGUMENT
  for name in names:
    assert name in details


@pytest.mark.parametrize("model, version, signature, code", [
    ("other", None, "serving_default", grpc.StatusCode.NOT_FOUND),
    ("asl", 1, "serving_default", grpc.StatusCode.NOT_FOUND),  # Only the latest is served.
    ("asl", None, "classify", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_unknown_model_version_or_signature(stub, model, version, signature, code):
  request = _request(signature, model=model, version=version, features=_features(1, 4),
                     lengths=np.array([4], np.int32))
  got, details = _grpc_error(stub, request)
  assert got == code
  assert (model if model != "asl" else signature if version is None else "asl, 1") in details


def test_classify_is_unimplemented(stub):
  with pytest.raises(grpc.RpcError) as info:
    stub.Classify(classification_pb2.ClassificationRequest(), timeout=10)
  assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_serves_the_requested_version(stand_in):
  inputs = {"features": _features(1, 6), "lengths": np.array([6], np.int32)}
  scores = {}
  for version in (1, 0):
    with testing_server.TestingServer(stand_in.base_path, model_version=version) as server, \
        grpc.insecure_channel(server.address) as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      response = stub.Predict(_request(**inputs), timeout=10)
      scores[response.model_spec.version.value] = tf.make_ndarray(response.outputs["scores"])
  assert sorted(scores) == [1, stand_in.latest_version]
  # Version 1 was written with score_bias -1: its logits are one lower.
  np.testing.assert_allclose(np.log(scores[1] / (1 - scores[1])),
                             np.log(scores[2] / (1 - scores[2])) - 1.0, atol=1e-5)


def test_message_limits_are_raised_on_both_ends(stub):
  # T = 18432 x C = 2048 float32 (~151 MB) must fit with protobuf framing to spare.
  assert testing_server.MAX_MESSAGE_BYTES >= 18432 * 2048 * 4 + (1 << 20)
  assert dict(testing_server.GRPC_MESSAGE_OPTIONS) == {
      "grpc.max_send_message_length": testing_server.MAX_MESSAGE_BYTES,
      "grpc.max_receive_message_length": testing_server.MAX_MESSAGE_BYTES}
  # A 6.4 MB request whose raw_scores response is ~7 MB: both directions pass the 4 MB default.
  frames = 200_000
  request = _request("raw_scores", features=_features(1, frames),
                     lengths=np.array([frames], np.int32))
  assert request.ByteSize() > 4 * 2**20
  response = stub.Predict(request, timeout=30)
  assert response.ByteSize() > 4 * 2**20
  assert tf.make_ndarray(response.outputs["points"]).shape == (frames, 4)


def test_default_grpc_limits_would_refuse_that_request(server):
  request = _request("raw_scores", features=_features(1, 200_000),
                     lengths=np.array([200_000], np.int32))
  with grpc.insecure_channel(server.address) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    code, _ = _grpc_error(stub, request)
  assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def _http(url, body=None):
  data = json.dumps(body).encode() if body is not None else None
  try:
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_rest_predict_equals_grpc(server, stub):
  features, lengths = _features(2, 11), np.array([11, 6], np.int32)
  status, body = _http(f"http://{server.rest_address}/v1/models/asl:predict", {
      "signature_name": "raw_scores",
      "inputs": {"features": features.tolist(), "lengths": lengths.tolist()}})
  assert status == 200
  response = stub.Predict(_request("raw_scores", features=features, lengths=lengths), timeout=10)
  for key, proto in response.outputs.items():
    want = tf.make_ndarray(proto)
    np.testing.assert_array_equal(np.asarray(body["outputs"][key], want.dtype), want)


def test_rest_errors_and_metadata(server, stand_in):
  base = f"http://{server.rest_address}/v1/models"
  status, body = _http(f"{base}/asl:predict", {"inputs": {"features": [[[0.0] * 3]],
                                                          "lengths": [1]}})
  assert status == 400 and "'features'" in body["error"] and "[-1,-1,8]" in body["error"]
  status, body = _http(f"{base}/other:predict", {"inputs": {}})
  assert status == 404 and "other" in body["error"]
  status, body = _http(f"{base}/asl/versions/{stand_in.latest_version}/metadata")
  assert status == 200
  assert set(body["metadata"]["signature_def"]["signature_def"]) == set(SIGNATURE_KEYS)
  status, body = _http(f"{base}/asl")
  assert body["model_version_status"][0]["state"] == "AVAILABLE"


def test_warmup_file_parses_and_is_replayed_at_load(tmp_path, stand_in):
  c = stand_in.input_dim
  path = stand_in.write(tmp_path, 7)
  file = warmup.write_warmup_requests(path, "asl", [
      ("serving_default", warmup.constant_inputs(1, 2304, c)),
      ("detect_full", warmup.constant_inputs(2, 64, c, with_lengths=False)),
  ])
  assert file == os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
  assert os.path.getsize(file) < 1024  # Constant inputs are stored compactly.
  logs = warmup.read_warmup_requests(path)
  shapes = [{k: tuple(tf.make_ndarray(v).shape) for k, v in log.predict_log.request.inputs.items()}
            for log in logs]
  assert [log.predict_log.request.model_spec.name for log in logs] == ["asl", "asl"]
  assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
      "serving_default", "detect_full"]
  assert shapes == [{"features": (1, 2304, c), "lengths": (1,)}, {"features": (2, 64, c)}]
  assert testing_server.Servable(str(tmp_path), "asl").num_warmup_requests == 2


def test_warmup_with_wrong_shape_fails_the_load(tmp_path, stand_in):
  path = stand_in.write(tmp_path, 1)
  warmup.write_warmup_requests(path, "asl", [
      ("serving_default", {"features": np.zeros((1, 4, stand_in.input_dim + 1), np.float32),
                           "lengths": np.array([4], np.int32)})])
  with pytest.raises(ValueError, match=r"record 1 failed: input 'features'"):
    testing_server.Servable(str(tmp_path), "asl")
  with pytest.raises(ValueError, match="1 to 1000"):
    warmup.write_warmup_requests(path, "asl", [])


def test_models_config_parses_as_model_server_config():
  config = text_format.Parse((REPO / "export" / "models.config").read_text(),
                             model_server_config_pb2.ModelServerConfig())
  (model,) = config.model_config_list.config
  assert (model.name, model.base_path, model.model_platform) == ("asl", "/models/asl",
                                                                 "tensorflow")


def test_batching_parameters_use_known_fields():
  # session_bundle_config.proto (BatchingParameters) is not in the pip package: check the syntax
  # and the field names by hand.
  known = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads",
           "thread_pool_name", "allowed_batch_sizes", "pad_variable_length_inputs"}
  fields = {}
  for line in (REPO / "export" / "batching_parameters.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      match = re.fullmatch(r"(\w+)\s*(?:\{\s*value:\s*(\d+)\s*\}|:\s*(\w+))", line)
      assert match, line
      fields[match[1]] = match[2] or match[3]
  assert set(fields) <= known
  assert fields["pad_variable_length_inputs"] == "true"
  assert int(fields["max_batch_size"]) >= 1


def test_a_one_value_request_declaring_too_many_frames_is_refused_before_allocation(stub):
  """82 bytes declaring a tensor of any size: refused on the declared shape."""
  request = _request(lengths=np.array([1], np.int32))
  huge = tf.make_tensor_proto(np.float32(0.5), shape=[1, testing_server.DEFAULT_MAX_FRAMES + 1, 8])
  request.inputs["features"].CopyFrom(huge)
  assert request.ByteSize() < 200
  code, details = _grpc_error(stub, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "serves at most" in details
  partial = _request(lengths=np.array([1], np.int32))
  proto = tf.make_tensor_proto(np.zeros([1, 3, 8], np.float32))
  proto.tensor_content = proto.tensor_content[:40]
  partial.inputs["features"].CopyFrom(proto)
  code, details = _grpc_error(stub, partial)
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "declares shape [1, 3, 8]" in details
  for key, proto in (("features", tf.make_tensor_proto(np.float32(0), shape=[2 ** 31, 1, 8])),
                     ("lengths", tf.make_tensor_proto(np.int32(1), shape=[2 ** 40]))):
    wide = _request(features=_features(1, 4), lengths=np.array([4], np.int32))
    wide.inputs[key].CopyFrom(proto)
    code, details = _grpc_error(stub, wide)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "a request may carry" in details


@pytest.mark.parametrize("body,message", [
    ("a JSON string", "must be a JSON object"),
    ({"signature_name": 3, "inputs": {}}, "signature_name must be a string"),
    ({"inputs": {"features": [[[0.0] * 8]], "lengths": [2 ** 40]}}, "outside int32"),
    ({"inputs": {"features": [[[0.0] * 8]], "lengths": [50.7]}}, "holds fractions"),
    ({"inputs": {"features": [[[0.0] * 8]], "lengths": [True]}}, "holds booleans"),
    ({"inputs": {"features": [[[True] * 8]], "lengths": [1]}}, "holds booleans"),
])
def test_rest_bodies_that_dropped_the_connection_or_were_cast_are_400(server, body, message):
  status, reply = _http(f"http://{server.rest_address}/v1/models/asl:predict", body)
  assert status == 400 and message in reply["error"], reply
