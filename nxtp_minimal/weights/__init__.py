"""Model files: the NXTP safetensors format (`format`), converters from the official checkpoints
(`convert`, `convert_clip`, `convert_llama`, `readers`) and the `download` command."""

from .format import (
    DEMO_DIR,
    FORMAT,
    check_state_dict,
    config_from_tensors,
    load,
    load_demo,
    load_for_command,
    metadata,
    need_tensor,
    open_safetensors,
    read_config,
    save,
)
