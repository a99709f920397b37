"""Frozen weights kept a second time in panels of outputs, multiplied by our own CPU kernel (server/panels.c).

For the few rows of a decode step, oneDNN's and MKL's matmuls read the weights far below memory bandwidth: over the
embedded base's 211 projections (float32, one thread, a 2-core AVX-512 EPYC) oneDNN on weights packed in its own
layout took 52 ms for 8 rows, 45 for 4, 60 for 2; the panel kernel, which streams every weight once and multiplies it
with up to 12 rows held in registers, 29, 27 and 26 (reading the weights once takes ~24). For a prefill's 256 rows it
is as fast as oneDNN (721 against 749 ms). benchmarks/linear_floor.py measures them side by side.

Each output sums its products in input order, whatever the number of rows, so a row's result does not depend on its
batch mates; it differs from MKL's and oneDNN's by summation order only (~1e-6 relative).

The kernel is C built once per machine with the C compiler that torch.compile uses too (`cc`, or $CC;
`-march=native`, OpenMP from the runtime torch has loaded), cached in ~/.cache/loraswap/kernels. It serves x86 CPUs
with AVX2 (16-output panels, 6 rows a pass; built so on the same EPYC, against oneDNN limited to AVX2: 65 against
83 ms for 8 rows, 848 against 861 for 256) or AVX-512. Where it cannot be built or does not apply (another CPU, a
weight not float32 on the CPU), `pack` returns None and callers use `F.linear`. The panels cost the weight's size
again in memory; training and merges keep using the plain weight (a merge packs it again).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("panels.c"), Path(__file__).with_name("decoder.c"))  # one library
HEADERS = (Path(__file__).with_name("vectors.h"),)  # included by the sources: part of what a build is keyed on
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


def _machine() -> str:
    """What -march=native compiles for: the CPU's model and flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))


def _cache_folder() -> Path:
    """Where built libraries are kept: the user's own cache folder (a shared temporary folder would let another user
    put a library there first), else a fresh private temporary one."""
    folder = Path.home() / ".cache" / "loraswap" / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return Path(tempfile.mkdtemp(prefix="loraswap-kernels-"))


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The library built for this machine (built on first use), or None where it cannot be."""
    return build("native")


def build(march: str) -> ctypes.CDLL | None:
    """The library built for `-march=<march>` (cached), or None where it cannot be built or is not to be used."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc, gcc or $CC): inference matmuls use F.linear (slower for decode steps)")
        return None
    flags = [*FLAGS, f"-march={march}"]
    texts = [source.read_text() for source in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, compiler, *flags, _machine()]).encode()).hexdigest()[:16]
    try:
        folder = _cache_folder()
        library = folder / f"kernels-{key}.so"
        if not library.exists():
            partial = folder / f".kernels-{key}-{os.getpid()}.so"
            subprocess.run([compiler, *flags, "-o", str(partial), *map(str, SOURCES), "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(partial, library)  # whole or absent: another process may be building the same
        built = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("the panel kernel did not build (%s): inference matmuls use F.linear", detail)
        return None
    built.panel_width.restype = ctypes.c_long
    if built.panel_width() == 0:
        log.info("no AVX for -march=%s: inference matmuls use F.linear, not the panel kernel", march)
        return None
    built.panel_linear.restype = None
    built.panel_linear.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return built


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] as panels [ceil(out / width), in, width] (the last zero-padded; the width is the kernel's:
    32 outputs with AVX-512), or None where the kernel does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or (library := kernel()) is None:
        return None
    width = library.panel_width()
    out, features = weight.shape
    padded = weight.detach().new_zeros(-(-out // width) * width, features)
    padded[:out] = weight.detach()
    return padded.t().reshape(features, -1, width).transpose(0, 1).contiguous()


def linear(x: torch.Tensor, panels: torch.Tensor, out: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight.T + bias with the weight's panels (no autograd: inference only)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    bias = None if bias is None else bias.contiguous()  # held until the call returns
    # the kernel reads and writes raw memory: every size it relies on is checked here
    if (rows.dtype != torch.float32 or rows.device.type != "cpu" or panels.shape[1] != rows.shape[1]
            or panels.shape[0] * panels.shape[2] < out or not panels.is_contiguous()
            or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != out))):
        raise ValueError(f"panel matmul: {rows.dtype} {rows.device.type} rows of {rows.shape[1]} features into {out} "
                         f"outputs, panels {tuple(panels.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    y = torch.empty(rows.shape[0], out, dtype=torch.float32)
    kernel().panel_linear(rows.data_ptr(), rows.shape[0], panels.data_ptr(), out, rows.shape[1],
                           None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.view(*x.shape[:-1], out)


class PanelLinear(nn.Module):
    """A frozen nn.Linear (the LM head) whose inference forwards multiply with its panels; with autograd on, the
    plain layer runs."""

    def __init__(self, layer: nn.Linear, panels: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.panels = panels

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.layer(x)
        return linear(x, self.panels, self.layer.out_features, self.layer.bias)
