"""The only code in weightsmith that touches model files."""
from .layout import Layout, detect_layout, is_norm, num_layers
from .files import read_json
from .reader import Checkpoint
from .writer import (DEFAULT_SHARD_SIZE, ShardedWriter, check_output, copy_side_files, output_folder, parse_size,
                     save_state_dict, write_config)

__all__ = [
    "Checkpoint", "DEFAULT_SHARD_SIZE", "Layout", "ShardedWriter", "check_output", "copy_side_files", "detect_layout",
    "is_norm", "num_layers", "output_folder", "parse_size", "read_json", "save_state_dict", "write_config",
]
