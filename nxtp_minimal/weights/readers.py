"""What the converters share: `Lazy` tensors over memory-mapped foreign files, and one-line errors.

Readers hand back `Lazy` tensors (the shape now, the data when written), so `convert.write` can stream
the 1.78B model to disk holding about one tensor in memory at once.
"""

import glob
import json
import os
import pickle
import re
from typing import Callable, NamedTuple

import torch

from ..tools.errors import check_exists
from .format import open_safetensors


class Lazy(NamedTuple):
    """A tensor known by its shape now and read (or computed) only when it is written."""

    shape: torch.Size
    read: Callable[[], torch.Tensor]


def now(t: torch.Tensor) -> Lazy:
    return Lazy(t.shape, lambda: t)


def need(path, what: str) -> str:
    return check_exists(path, what, "See weights/README.md for where to get it.")


def first_sentence(e: Exception) -> str:
    return str(e).strip().split("\n")[0].split(". ")[0]


def load_pth(path):
    """A torch.save file, memory-mapped; weights_only refuses to run code hidden in a pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it refers to {found.group(1)}" if found else first_sentence(e)
        raise ValueError(
            f"{path} holds Python objects other than tensors, which torch.load(weights_only=True) refuses to "
            f"unpickle ({reason}). Only if you trust the file, keep its tensors: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False, map_location='cpu'); "
            f"torch.save({{'model': c['model']}}, 'model_only.pth')\" and convert model_only.pth"
        ) from None
    except RuntimeError as e:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint that can be memory-mapped ({first_sentence(e)}); "
            "expected a torch.save file (zip format, PyTorch >= 1.6)"
        ) from None


def load_safetensors(paths) -> dict:
    tensors = {}
    for path in paths:
        f = open_safetensors(path)
        for key in f.keys():
            tensors[key] = Lazy(torch.Size(f.get_slice(key).get_shape()), lambda f=f, key=key: f.get_tensor(key))
    return tensors


def safetensors_in(folder) -> list:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def heads(width: int, head_dim: int, flag: str) -> int:
    """The number of heads of the usual size `head_dim`, or an error that says which flag sets it."""
    if width % head_dim:
        raise ValueError(
            f"cannot tell the number of heads of width {width} (not a multiple of the usual head size "
            f"{head_dim}); pass {flag}"
        )
    return width // head_dim
