"""Targets, one module each, named as in the kernel. Importing this package registers them all."""

from . import error, linear, striped, zero  # noqa: F401
