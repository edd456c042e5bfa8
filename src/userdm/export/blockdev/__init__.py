"""Kernel block devices for mapped devices (loop devices over their FUSE files) and lockfs."""

from .export import BlockDevices

__all__ = ["BlockDevices"]
