"""dsa-train: continued training of DeepSeek-style models into DeepSeek Sparse Attention."""

__version__ = "0.1.0"
