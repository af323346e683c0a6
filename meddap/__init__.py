"""meddap: the MEDDAP study (LoRA-adapted Stable Diffusion augmentation of small medical-image datasets) on Ray.

Stages: prepare -> finetune -> generate -> fid -> sweep -> report; `python -m meddap --help`.
"""

from meddap.config import Config, ConfigError, load_config
from meddap.errors import MeddapError

__all__ = ["Config", "ConfigError", "MeddapError", "load_config"]
__version__ = "0.1.0"
