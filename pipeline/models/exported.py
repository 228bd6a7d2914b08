"""Architecture-free checkpoints: ``torch.export`` programs (``.pt2``), whose graph is the architecture.

A program runs without any registry entry. Its metadata (``ModelMeta`` as JSON, ``class_names`` at least) is
inside the archive as the extra file ``segpipe/meta.json`` (``segpipe import-weights`` puts it there), or in
a file beside it, ``<program>.json``. What the metadata leaves out is read from the program's input shape:

- height and width exported dynamic (``torch.export.Dim``): the "pad" policy, with the stride the dims were
  declared multiples of (``16 * Dim("h")`` gives 16);
- static: the "resize" policy at that size, which the default tile then equals, so sliding windows reach
  the program at exactly its size;
- a static batch: batches are cut and zero-padded to it.

Loading a program deserialises a graph and tensors; no Python code is unpickled.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import fields

import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, meta_from_dict, meta_to_dict
from pipeline.palette import voc_colormap

PROGRAM_ARCH = "torch.export"  # ModelMeta.arch of a program: the graph is the architecture
META_FILE = "segpipe/meta.json"
SIDECAR_SUFFIX = ".json"


def is_program(data: bytes) -> bool:
    """A ``torch.export.save`` archive: a zip holding ``<name>/archive_format`` (``torch.save`` zips have none)."""
    if data[:4] != b"PK\x03\x04":
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False
    return any(name.endswith("/archive_format") for name in names)


class ExportedModel(nn.Module):
    """A program as a model: one image batch in, the logits out; a static batch size is served in slices."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.exported = program
        self.program = program.module()
        batch = _input_dims(program)[0]
        self.batch = batch if isinstance(batch, int) else None

    def train(self, mode: bool = True) -> ExportedModel:
        # The graph was traced in one mode and keeps it; an exported module refuses .train()/.eval().
        self.training = mode
        return self

    def to(self, *args, **kwargs) -> ExportedModel:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and torch.device(device) != _device_of(self.exported):
            # A program's graph may name its device (e.g. in a zeros() call): move it with torch's pass.
            from torch.export.passes import move_to_device_pass

            self.exported = move_to_device_pass(self.exported, device)
            self.program = self.exported.module()
        return super().to(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            return _main_output(self.program(x))
        parts = []
        for part in x.split(self.batch):
            n = part.shape[0]
            if n < self.batch:
                part = torch.cat([part, part.new_zeros((self.batch - n, *part.shape[1:]))])
            parts.append(_main_output(self.program(part))[:n])
        return torch.cat(parts)


def load_program(data: bytes, source: str, sidecar: bytes | None = None) -> tuple[nn.Module, ModelMeta]:
    """The program in ``data`` as a model, and its metadata (inside the archive, else ``sidecar``)."""
    program, inside = _read(data, source)
    text = inside or (sidecar.decode() if sidecar else "")
    if not text:
        raise CheckpointError(
            f"exported program {source} has no segpipe metadata: put class_names (and mean, std) in "
            f"{source}{SIDECAR_SUFFIX}, or embed them with `segpipe import-weights {source} --classes ... --out ...`"
        )
    return ExportedModel(program), program_meta(program, _parse(text, source), source)


def save_program(data: bytes, given: dict, source: str) -> bytes:
    """The program in ``data`` saved again with its metadata inside: what it held, updated by ``given``,
    completed from the program and checked against it."""
    program, inside = _read(data, source)
    meta = program_meta(program, (_parse(inside, source) if inside else {}) | given, source)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={META_FILE: json.dumps(meta_to_dict(meta))})
    return buf.getvalue()


def _read(data: bytes, source: str) -> tuple[torch.export.ExportedProgram, str]:
    """The program, and the metadata inside it ("" when none)."""
    extra = {META_FILE: ""}
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as e:
        raise CheckpointError(f"cannot read exported program {source}: {_first_line(e)}") from e
    return program, extra[META_FILE]


def _parse(text: str, source: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the metadata of exported program {source} is not JSON: {e}") from e


def program_meta(program: torch.export.ExportedProgram, given: dict, source: str) -> ModelMeta:
    """``given`` metadata completed from the program's input shape (see the module docstring)."""
    known = {f.name for f in fields(ModelMeta)}
    if not isinstance(given, dict) or not given.get("class_names"):
        raise CheckpointError(f"the metadata of exported program {source} must name its class_names")
    if unknown := sorted(set(given) - known):
        raise CheckpointError(f"the metadata of exported program {source} has unknown fields: {', '.join(unknown)}")
    _, channels, height, width = _input_dims(program, source)
    if channels != 3:
        raise CheckpointError(f"exported program {source} takes {channels} channels; segpipe feeds RGB (3)")
    if isinstance(height, int) != isinstance(width, int):
        raise CheckpointError(f"exported program {source}: export height and width both dynamic or both static")
    if isinstance(height, int):
        derived = {"input_policy": "resize", "size": [height, width], "stride": 1}
    else:
        derived = {"input_policy": "pad", "stride": math.lcm(_multiple_of(height), _multiple_of(width))}
    n = len(given["class_names"])
    defaults = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "palette": voc_colormap(n).tolist()}
    meta = meta_from_dict({**defaults, **derived, **given, "arch": PROGRAM_ARCH})
    outputs = _output_channels(program)
    if outputs is not None and outputs != meta.num_classes:
        raise CheckpointError(
            f"exported program {source} outputs {outputs} classes, but its metadata names {meta.num_classes}"
        )
    return meta


def _input_dims(program: torch.export.ExportedProgram, source: str = "program") -> tuple:
    """The [N, C, H, W] of the program's one input: ints where static, SymInts where dynamic."""
    names = program.graph_signature.user_inputs
    if len(names) != 1:
        raise CheckpointError(f"exported program {source} takes {len(names)} inputs; segpipe passes one image batch")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    shape = tuple(node.meta["val"].shape)
    if len(shape) != 4:
        raise CheckpointError(f"exported program {source} takes a {len(shape)}-d input; segpipe passes [N, 3, H, W]")
    return shape


def _multiple_of(dim: torch.SymInt) -> int:
    """The factor a dynamic dim was declared with: 16 for ``16 * Dim("h")``, 1 for a plain ``Dim``."""
    coefficient = dim.node.expr.as_coeff_Mul()[0]
    return int(coefficient) if coefficient.is_Integer and coefficient > 0 else 1


def _output_channels(program: torch.export.ExportedProgram) -> int | None:
    """The static class count of the program's first output, if it has one."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    first = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    val = getattr(first, "meta", {}).get("val")
    if val is None or val.dim() != 4 or not isinstance(val.shape[1], int):
        return None
    return val.shape[1]


def _main_output(out) -> torch.Tensor:
    """The logits of a program that returns a tensor, torchvision's ``{"out": ...}``, or a tuple (first)."""
    if isinstance(out, dict):
        return out["out"] if "out" in out else next(iter(out.values()))
    return out[0] if isinstance(out, (tuple, list)) else out


def _device_of(program: torch.export.ExportedProgram) -> torch.device:
    tensor = next(iter(program.state_dict.values()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
