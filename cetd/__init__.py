"""cetd: the collaborative edge training daemon.

The idle devices of one household find each other, prove that they belong together, elect a
coordinator and train one Hugging Face Transformer model together. See DESIGN notes in README.md.
"""

__version__ = "0.1.0"
