"""ehrmem: audit generative EHR foundation models for memorization of individual patients."""

from ehrmem._version import __version__
from ehrmem.errors import EhrmemError, InputError, ModelError, NumericalError

__all__ = ["__version__", "EhrmemError", "InputError", "ModelError", "NumericalError"]
