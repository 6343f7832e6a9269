"""worldplay: a native PyTorch implementation of the HY-WorldPlay WAN-5B world model."""

__version__ = "0.1.0"
