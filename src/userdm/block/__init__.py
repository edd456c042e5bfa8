"""The block layer: devices, opens, claims, holders and the backing stores under tables."""

from .backing import BackingStores
from .device import STATUS_HOLE, STATUS_ZERO, SECTOR, BlockDevice, BlockOpen, HolderOps
from .file import FileDisk
from .memory import MemoryDisk

__all__ = ["BackingStores", "BlockDevice", "BlockOpen", "FileDisk", "HolderOps", "MemoryDisk",
           "SECTOR", "STATUS_HOLE", "STATUS_ZERO"]
