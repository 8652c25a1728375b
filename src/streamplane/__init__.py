"""streamplane: the control plane and the data plane of a video streaming service."""

__version__ = "0.1.0"
