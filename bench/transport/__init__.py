"""Tensor transport benchmark: cetd's mTLS tensor stream against a raw TLS socket and gloo."""
