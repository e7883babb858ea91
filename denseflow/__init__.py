"""denseflow: Densely connected normalizing flows (DenseFlow, NeurIPS 2021) in PyTorch."""

from .config import ConfigError, ModelConfig, model_config
from .model import DenseFlow
from .official import convert_official

__version__ = "0.1.0"

__all__ = ["ConfigError", "DenseFlow", "ModelConfig", "convert_official", "model_config", "__version__"]
