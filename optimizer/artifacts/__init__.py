"""Artifacts in and out: model and data URIs (s3://, pvc://, files), the cache, ONNX files with
external data, and delivering a run's outputs."""
