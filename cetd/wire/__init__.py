"""Generated protobuf and gRPC code (protos/generate.py). Do not edit."""
