"""The `quantfx` command line, an application on the library: `cli` parses and runs a
subcommand (errors as one line), `commands` runs quantize / doctor / analyze, `models` reads the
models they name. The demo (`quantfx.demo`) is the other application."""
