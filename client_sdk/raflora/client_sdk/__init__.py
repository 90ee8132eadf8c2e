"""Thin client SDK for training jobs (grpcio, protobuf, safetensors, torch); see README."""
