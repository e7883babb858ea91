"""denseflow: Densely connected normalizing flows (DenseFlow, NeurIPS 2021) in PyTorch."""

__version__ = "0.1.0"

from .config import ConfigError, ModelConfig, model_config  # noqa: E402
from .errors import DenseFlowError  # noqa: E402
from .model import DenseFlow  # noqa: E402
from .official import convert_official  # noqa: E402

__all__ = [
    "ConfigError",
    "DenseFlow",
    "DenseFlowError",
    "ModelConfig",
    "convert_official",
    "model_config",
    "__version__",
]
