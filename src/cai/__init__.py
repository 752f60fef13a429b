"""constitutional-ai: Constitutional AI end to end (Bai et al. 2022)."""

__version__ = "0.1.0"
