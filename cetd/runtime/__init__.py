"""Training runtime: the only layer that imports torch and transformers.

Model adapters split a Hugging Face model into embedding / blocks / head; schedules, parallel layers
and collectives run those pieces across workers, talking to peers only through `PeerChannel`.
"""
