"""Frozen modules parked in a file: their weights written out, their memory freed, and read back
bit for bit. On the CPU, where there is no host to move them to, this is how the text encoders
and the VAE leave memory from the mask to the grids (the prompts' embeddings and the images'
latents are made before; erase/erasure.py). The whole-buffer reads and writes at an offset are
shared with the saliency gradients' file (erase/saliency.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence

import torch


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of `module` (non-persistent buffers too), each once."""
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def write_at(file, data: memoryview, offset: int) -> None:
    """All of `data` into `file` at `offset` (plain pwrite: page cache, no mmap)."""
    done = 0
    while done < len(data):
        done += os.pwrite(file.fileno(), data[done:], offset + done)


def read_at(file, buffer: memoryview, offset: int, error: str) -> None:
    """Fill `buffer` from `file` at `offset`; OSError(`error`) if the file ends first."""
    done = 0
    while done < len(buffer):
        count = os.preadv(file.fileno(), [buffer[done:]], offset + done)
        if count == 0:
            raise OSError(error)
        done += count


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class ParkedModules:
    """The parameters and buffers of CPU `modules` in an unnamed file in `folder`, each tensor's
    data swapped for an empty one meanwhile (the memory freed; the Parameter objects, which the
    caller may hold, stay); `restore` reads them back bit for bit, with their strides. The file
    is deleted when restored or when the process ends."""

    def __init__(self, modules: Sequence[torch.nn.Module], folder: str):
        self.file = tempfile.TemporaryFile(dir=folder)
        self.tensors: list[tuple[torch.Tensor, torch.Size, tuple[int, ...], int]] = []
        offset = 0
        for module in modules:
            for tensor in module_tensors(module):
                dense = tensor.detach().contiguous()  # written in logical order
                data = tensor_bytes(dense)
                write_at(self.file, data, offset)
                self.tensors.append((tensor, tensor.shape, tensor.stride(), offset))
                offset += len(data)
        self.size = offset  # bytes parked
        for tensor, *_ in self.tensors:
            tensor.data = torch.empty(0, dtype=tensor.dtype)  # any use now fails loudly

    def restore(self) -> None:
        """Every tensor back with the values, shape and strides it had; the file deleted."""
        for tensor, shape, stride, offset in self.tensors:
            dense = torch.empty(shape, dtype=tensor.dtype)
            read_at(self.file, tensor_bytes(dense), offset, "the parked encoders' file ends early")
            if dense.stride() != stride:
                dense = torch.empty_strided(shape, stride, dtype=tensor.dtype).copy_(dense)
            tensor.data = dense
        self.tensors = []
        self.file.close()
