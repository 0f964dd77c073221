"""Transport: grpc.aio servers and channels with mutual TLS, the tensor codec and the servicers.

Protobuf messages never leave this package: codecs convert wire messages to domain types.
"""
