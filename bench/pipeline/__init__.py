"""Pipeline benchmark: cetd's 2-stage pipeline against one device and torch.distributed.pipelining."""
