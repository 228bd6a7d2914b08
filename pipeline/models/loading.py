"""A job's model, from whichever of the four places its config names; the driver's preflight and every actor
load it here, and the actors check that they got the very bytes the driver checked.

- ``model: hf:<repo or folder>``: a Hugging Face ``transformers`` model (``huggingface.py``);
- ``weights: <name>`` with a torchvision ``model``: torchvision's published weights (``pretrained.py``);
- ``checkpoint_uri`` holding a segpipe checkpoint (``checkpoint.py``), or a ``torch.export`` program
  (``exported.py``) with its metadata inside or in ``<uri>.json`` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import ModelMeta, load_checkpoint, read_checkpoint, sha256_hex
from pipeline.models.exported import PROGRAM_ARCH, SIDECAR_SUFFIX, is_program, load_program
from pipeline.models.huggingface import is_hf, load_hf
from pipeline.models.pretrained import load_pretrained
from pipeline.storage import location_error

if TYPE_CHECKING:
    from pipeline.config import JobConfig


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # in eval mode, on the CPU
    meta: ModelMeta
    sha256: str  # of what it was loaded from: the checkpoint, the weights file, or the Hugging Face folder


def model_source(cfg: JobConfig) -> str:
    """Where ``cfg``'s model comes from, in words, for logs and the manifest."""
    if is_hf(cfg.model):
        return f"Hugging Face {cfg.model.removeprefix('hf:')}"
    if cfg.weights:
        return f"torchvision weights {cfg.weights} of {cfg.model}"
    return f"checkpoint {cfg.checkpoint_uri}"


def load_model(cfg: JobConfig) -> LoadedModel:
    """``cfg``'s model; ``cfg.checkpoint_sha256``, when set, must be the sha256 of what it is loaded from."""
    if is_hf(cfg.model):
        return LoadedModel(*load_hf(cfg.model, cfg.checkpoint_sha256))
    if cfg.weights:
        return LoadedModel(*load_pretrained(cfg.model, cfg.weights, cfg.checkpoint_sha256))
    uri = cfg.checkpoint_uri
    data = read_checkpoint(cfg.resolve, uri)
    digest = sha256_hex(data)
    if cfg.checkpoint_sha256 is not None and digest != cfg.checkpoint_sha256.lower():
        raise CheckpointError(f"checkpoint {uri} has sha256 {digest}, but {cfg.checkpoint_sha256} was expected")
    if not is_program(data):
        return LoadedModel(*load_checkpoint(data, uri, expect_arch=cfg.model), digest)
    if cfg.model not in (None, PROGRAM_ARCH):
        raise CheckpointError(f"checkpoint {uri} is a torch.export program, but the config asks for model {cfg.model}")
    return LoadedModel(*load_program(data, uri, _sidecar(cfg, uri + SIDECAR_SUFFIX)), digest)


def _sidecar(cfg: JobConfig, uri: str) -> bytes | None:
    """The bytes at ``uri``, or None when there is no such file."""
    try:
        fs, path = cfg.resolve(uri)
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as e:
        raise location_error(e, f"cannot read program metadata {uri}: {e}", CheckpointError) from e
