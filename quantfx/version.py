"""quantfx's version (one place: the package, the exported files' metadata)."""

__version__ = "0.2.0"
