"""The library version (`userdm version`, `Mapper.version`)."""

__version__ = "0.1.0"
