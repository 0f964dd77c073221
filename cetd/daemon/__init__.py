"""The daemon: composition root that wires identity, discovery, transport and cluster logic together,
owns the event loop and the lifecycle, and supervises job workers."""
