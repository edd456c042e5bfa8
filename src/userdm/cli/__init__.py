"""The dmsetup-compatible command line."""
