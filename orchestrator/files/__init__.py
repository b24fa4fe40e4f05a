"""Bytes and where they live, beneath every other package: the filesystem helper (local paths and s3://, gs://,
atomic writes, locks, the cache), the strict JSON parser, safetensors weights, and digests of tensors and models."""
