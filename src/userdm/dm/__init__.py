"""The device-mapper core: tables, targets, mapped devices and their registry."""

from .mapped import DM_HOLDER, DM_MAJOR, MappedDevice
from .mapper import Mapper
from .table import Table, build_table, parse_table, split_args
from .target import TableDevice, Target, TargetContext, TargetError, register

__all__ = ["DM_HOLDER", "DM_MAJOR", "MappedDevice", "Mapper", "Table", "TableDevice", "Target",
           "TargetContext", "TargetError", "build_table", "parse_table", "register", "split_args"]
